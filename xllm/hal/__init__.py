"""The hardware-abstraction layer: the one contract between the engine and every accelerator.

Everything above this package (models, engine, service) talks to a `Backend` obtained from
`get_backend()` and never names a device.
"""

from xllm.hal.backend import FLOAT_DTYPES, Backend, Capabilities
from xllm.hal.comm import Communicator
from xllm.hal.errors import (
    BackendUnavailableError,
    DeviceFaultError,
    HALError,
    NotSupportedError,
    UnknownBackendError,
    UnmappedMemoryError,
)
from xllm.hal.graphs import DEFAULT_CAPTURE_SIZES, EagerGraphRunner, GraphInput, GraphRunner
from xllm.hal.kv_transfer import (
    KVLayout,
    KVLayoutMismatchError,
    KVTransferCancelled,
    KVTransferEngine,
    KVTransferError,
    KVTransferTimeout,
    TransferEngineState,
    TransferStats,
)
from xllm.hal.memory import MemInfo, XTensor
from xllm.hal.metadata import AttentionMetadata, SampleOutput, SamplingMetadata, pad_token_lists
from xllm.hal.registry import (
    BackendInfo,
    get_backend,
    known_backend_names,
    list_backends,
    register_backend,
    unregister_backend,
)
from xllm.hal.sampling_ops import mask_banned_tokens
from xllm.hal.streams import Event, Stream, SyncEvent, SyncStream, SyncStreams

__all__ = [
    "FLOAT_DTYPES",
    "AttentionMetadata",
    "Backend",
    "BackendInfo",
    "BackendUnavailableError",
    "Capabilities",
    "Communicator",
    "DEFAULT_CAPTURE_SIZES",
    "DeviceFaultError",
    "EagerGraphRunner",
    "Event",
    "GraphInput",
    "GraphRunner",
    "HALError",
    "KVLayout",
    "KVLayoutMismatchError",
    "KVTransferCancelled",
    "KVTransferEngine",
    "KVTransferError",
    "KVTransferTimeout",
    "MemInfo",
    "NotSupportedError",
    "SampleOutput",
    "SamplingMetadata",
    "Stream",
    "SyncEvent",
    "SyncStream",
    "SyncStreams",
    "TransferEngineState",
    "TransferStats",
    "UnknownBackendError",
    "UnmappedMemoryError",
    "XTensor",
    "get_backend",
    "known_backend_names",
    "list_backends",
    "mask_banned_tokens",
    "pad_token_lists",
    "register_backend",
    "unregister_backend",
]

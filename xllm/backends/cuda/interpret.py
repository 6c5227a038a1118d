"""`CudaInterpretBackend`: the CUDA backend's Triton kernels run by Triton's interpreter on host tensors.

The kernels are the very same as `CudaBackend`'s, launched with ``TRITON_INTERPRET=1`` on CPU
tensors: that is how they are tested, and certified by the conformance suite, on machines without
a GPU. Everything that needs a GPU is replaced here, one override each: tensors live on the host,
streams and events are the HAL's synchronous ones, graphs replay eagerly, collectives use gloo,
and there is no virtual-memory xTensor; the capabilities say so. It is what
``CudaBackend(interpret=True)``, ``get_backend("cuda", interpret=True)`` and
``xllm conformance --backend cuda --interpret`` build (`CudaBackend._mode_class` chooses).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from xllm.backends.cuda import runtime
from xllm.backends.cuda.backend import CudaBackend
from xllm.backends.cuda.comm import TorchDistCommunicator
from xllm.hal import (
    FLOAT_DTYPES,
    Capabilities,
    Communicator,
    EagerGraphRunner,
    Event,
    GraphInput,
    GraphRunner,
    MemInfo,
    NotSupportedError,
    Stream,
    SyncEvent,
    SyncStream,
    XTensor,
)


class CudaInterpretBackend(CudaBackend):
    # `CAPABILITIES` stays the GPU backend's (what `xllm backends` lists for "cuda"); an instance
    # reports what interpret mode can do through `capabilities`.
    INTERPRET_CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        dtypes=FLOAT_DTYPES,
        shares_host_memory=True,  # the interpreter's tensors are host tensors
        graph_capture=False,
        virtual_memory=False,
        collective_backend="gloo",
        notes=("Triton interpreter on the host: kernels are exact but slow; no graphs, VMM or NCCL",),
    )
    interpret_kernels: ClassVar[bool] = True
    # Arbitrary but fixed, so interpreted runs take the split-KV decisions a small GPU would.
    NUM_SMS: ClassVar[int] = 8

    def __init__(self, interpret: bool = True) -> None:
        # Sets TRITON_INTERPRET=1 in os.environ before the kernels are imported (triton reads it
        # then); a no-op if the caller already set it.
        reason = runtime.enable_interpreter()
        if reason is not None:
            raise RuntimeError(f"cuda backend cannot interpret its kernels: {reason}")
        super().__init__()

    @classmethod
    def _probe_mode(cls) -> str | None:
        # Side effect: sets TRITON_INTERPRET=1 in os.environ if unset, because triton decides
        # interpreted vs compiled when the kernels are defined, which must come after this.
        return runtime.enable_interpreter()

    @property
    def capabilities(self) -> Capabilities:
        return self.INTERPRET_CAPABILITIES

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def _sm_count(self, device: torch.device) -> int:
        return self.NUM_SMS

    def _mem_info(self, device_index: int) -> MemInfo:
        page = os.sysconf("SC_PAGE_SIZE")
        return MemInfo(os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page)

    def _create_xtensor(self, num_pages: int, page_size_bytes: int | None, device_index: int) -> XTensor:
        raise NotSupportedError("cuda backend in interpret mode has no virtual-memory xTensor support")

    def _create_graph_runner(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        capture_sizes: Sequence[int] | None,
        max_batch_size: int | None,
        device_index: int,
    ) -> GraphRunner:
        return EagerGraphRunner(fn, inputs, self.device(device_index), capture_sizes, max_batch_size)

    # Kernels run synchronously on the host: every call has finished when it returns.

    def create_stream(self, device_index: int = 0) -> Stream:
        return SyncStream()

    def create_event(self, enable_timing: bool = False) -> Event:
        return SyncEvent(enable_timing)

    def current_stream(self, device_index: int = 0) -> Stream:
        return SyncStream()

    def synchronize(self, device_index: int = 0) -> None:
        pass

    def _create_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        return TorchDistCommunicator(rank, world_size, init_method, "gloo", torch.device("cpu"))


__all__ = ["CudaInterpretBackend"]

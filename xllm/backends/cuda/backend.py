"""`CudaBackend`: the HAL contract on NVIDIA GPUs.

Ops are Triton kernels (`kernels/`), sampling is the HAL's `sampling_ops` on the GPU, decode graphs are
`torch.cuda.CUDAGraph` (`graphs.py`), xTensor uses the CUDA virtual memory API through cuda-python
(`memory.py`), streams/events are torch.cuda's, and the communicator is torch.distributed over
NCCL. Importing this module imports neither triton nor cuda-python: `xllm backends` probes it on
machines that have neither.

``CudaBackend(interpret=True)`` builds `CudaInterpretBackend` (`interpret.py`), a subclass that
runs the very same Triton kernels in Triton's interpreter on host tensors (``TRITON_INTERPRET=1``):
that is how the kernels are tested and checked by the conformance suite on machines without a
GPU. This class is the GPU; `_mode_class` is the one place that chooses between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from xllm.backends.cuda import runtime
from xllm.backends.cuda.comm import TorchDistCommunicator
from xllm.backends.cuda.faults import is_fatal_cuda_error
from xllm.backends.cuda.graphs import CudaGraphRunner
from xllm.backends.cuda.streams import CudaEvent, CudaStream
from xllm.hal import (
    FLOAT_DTYPES,
    AttentionMetadata,
    Backend,
    Capabilities,
    Communicator,
    Event,
    GraphInput,
    GraphRunner,
    KVTransferEngine,
    MemInfo,
    NotSupportedError,
    SampleOutput,
    SamplingMetadata,
    Stream,
    XTensor,
)
from xllm.hal import sampling_ops as sampler


class CudaBackend(Backend):
    name: ClassVar[str] = "cuda"
    device_type: ClassVar[str] = "cuda"
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        dtypes=FLOAT_DTYPES,
        graph_capture=True,
        virtual_memory=True,
        collective_backend="nccl",
    )
    # Whether the kernels are launched for Triton's interpreter (their bf16 rounding and dot
    # workarounds); CudaInterpretBackend sets it.
    interpret_kernels: ClassVar[bool] = False

    def __new__(cls, interpret: bool = False) -> CudaBackend:
        # So that CudaBackend(interpret=True), and with it get_backend("cuda", interpret=True) and
        # `xllm conformance --interpret`, build the interpreter subclass (as pathlib.Path() builds
        # a PosixPath); the registry and its callers stay unaware of the modes.
        return super().__new__(cls._mode_class(interpret))

    def __init__(self, interpret: bool = False) -> None:  # `interpret` chose the class in __new__
        # Imported here, not at module top: triton must not be imported by merely listing backends.
        from xllm.backends.cuda.kernels import activation, attention, cache, rms_norm, rotary

        self._k_activation = activation
        self._k_attention = attention
        self._k_cache = cache
        self._k_rms_norm = rms_norm
        self._k_rotary = rotary
        self._num_sms: dict[int, int] = {}

    # ------------------------------------------------------------------ identity

    @classmethod
    def _mode_class(cls, interpret: bool) -> type[CudaBackend]:
        """The class that runs the kernels as asked: the one place interpret mode is chosen."""
        if not interpret or cls.interpret_kernels:
            return cls
        if cls is not CudaBackend:  # silently dropping a subclass's overrides would be worse
            raise TypeError(
                f"{cls.__name__} launches compiled kernels; derive it from CudaInterpretBackend "
                "(xllm.backends.cuda.interpret) to run them in the interpreter"
            )
        from xllm.backends.cuda.interpret import CudaInterpretBackend

        return CudaInterpretBackend

    @classmethod
    def probe(cls, **options: object) -> str | None:
        # The one option: interpret=True runs the kernels in Triton's interpreter (no GPU needed).
        interpret = bool(options.pop("interpret", False))
        if options:
            return f"unknown options {sorted(options)} (cuda takes 'interpret')"
        try:
            mode = cls._mode_class(interpret)
        except TypeError as exc:
            return str(exc)
        return mode._probe_mode()

    @classmethod
    def _probe_mode(cls) -> str | None:
        """`probe` for this class's mode, once `probe` has read the options."""
        if not torch.backends.cuda.is_built() or torch.version.cuda is None:
            return "torch was built without CUDA"
        try:
            if torch.cuda.device_count() == 0:
                return "no CUDA device visible"
        except Exception as exc:  # a broken driver install must read as a reason, not a crash
            return f"CUDA driver error: {exc}"
        if not runtime.triton_installed():
            return "triton is not installed"
        if runtime.interpreter_enabled():
            return f"{runtime.INTERPRET_ENV} is set: kernels would run in the interpreter; use interpret=True"
        return None

    @classmethod
    def device_count(cls) -> int:
        try:
            return torch.cuda.device_count() if torch.backends.cuda.is_built() else 0
        except Exception:
            return 0

    def _sm_count(self, device: torch.device) -> int:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._num_sms:
            self._num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._num_sms[index]

    # ------------------------------------------------------------------ ops

    def _rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._k_rms_norm.rms_norm(x, weight, eps, residual, interpret=self.interpret_kernels)

    def _rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        neox_style: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k_rotary.rotary_embedding(
            positions, q, k, cos_sin_cache, neox_style, interpret=self.interpret_kernels
        )

    def _silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._k_activation.silu_and_mul(x, interpret=self.interpret_kernels)

    def _gelu_and_mul(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return self._k_activation.gelu_and_mul(x, approximate, interpret=self.interpret_kernels)

    def _reshape_and_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        self._k_cache.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        md = metadata
        return self._k_attention.paged_attention(
            q,
            k_cache,
            v_cache,
            md.query_start_loc,
            md.seq_lens,
            md.block_tables,
            md.max_query_len,
            md.max_seq_len,
            md.scale,
            md.sliding_window,
            interpret=self.interpret_kernels,
            num_sms=self._sm_count(q.device),
        )

    def _processed_logits(self, logits: torch.Tensor, sampling: SamplingMetadata) -> torch.Tensor:
        return sampler.processed_logits(logits, sampling)

    def _sample(self, logits: torch.Tensor, sampling: SamplingMetadata) -> SampleOutput:
        return sampler.sample(logits, sampling)

    # ------------------------------------------------------------------ memory

    def _mem_info(self, device_index: int) -> MemInfo:
        free, total = torch.cuda.mem_get_info(device_index)
        return MemInfo(int(free), int(total))

    def _create_xtensor(self, num_pages: int, page_size_bytes: int | None, device_index: int) -> XTensor:
        try:
            from xllm.backends.cuda.memory import CudaXTensor, load_driver

            load_driver()
        except ImportError as exc:
            raise NotSupportedError(
                f"xTensor on CUDA needs cuda-python (pip install cuda-python): {exc}"
            ) from exc
        return CudaXTensor(num_pages, page_size_bytes, device_index)

    # ------------------------------------------------------------------ graphs

    def _create_graph_runner(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        capture_sizes: Sequence[int] | None,
        max_batch_size: int | None,
        device_index: int,
    ) -> GraphRunner:
        return CudaGraphRunner(fn, inputs, self.device(device_index), capture_sizes, max_batch_size)

    # ------------------------------------------------------------------ streams

    def create_stream(self, device_index: int = 0) -> Stream:
        return CudaStream(torch.cuda.Stream(device=self.device(device_index)))

    def create_event(self, enable_timing: bool = False) -> Event:
        return CudaEvent(enable_timing)

    def current_stream(self, device_index: int = 0) -> Stream:
        return CudaStream(torch.cuda.current_stream(self.device(device_index)))

    def synchronize(self, device_index: int = 0) -> None:
        torch.cuda.synchronize(self.device(device_index))

    # ------------------------------------------------------------------ comm

    def _create_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        # One GPU per rank, the usual tensor-parallel layout within a node.
        device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        return TorchDistCommunicator(rank, world_size, init_method, "nccl", device)

    def create_kv_transfer(
        self, host: str = "127.0.0.1", port: int = 0, **options: object
    ) -> KVTransferEngine:
        # TCP control plane with the KV over NCCL between two GPUs, pinned staging otherwise
        # (see kv_transfer.py).
        from xllm.backends.cuda.kv_transfer import create_cuda_kv_transfer

        return create_cuda_kv_transfer(host, port, **options)

    # ------------------------------------------------------------------ faults

    def _is_fatal_error(self, exc: BaseException) -> bool:
        # Sticky CUDA errors and lost GPUs (see faults.py); out of memory is not one of them.
        return is_fatal_cuda_error(exc)


__all__ = ["CudaBackend"]

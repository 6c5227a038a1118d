"""`CudaBackend`: the HAL contract on NVIDIA GPUs.

Ops are Triton kernels (`kernels/`), sampling is batched torch (`sampling.py`), decode graphs are
`torch.cuda.CUDAGraph` (`graphs.py`), xTensor uses the CUDA virtual memory API through cuda-python
(`memory.py`), streams/events are torch.cuda's, and the communicator is torch.distributed over
NCCL. Importing this module imports neither triton nor cuda-python: `xllm backends` probes it on
machines that have neither.

``CudaBackend(interpret=True)`` runs the very same Triton kernels in Triton's interpreter on host
tensors (``TRITON_INTERPRET=1``). That is how the kernels are tested and checked by the
conformance suite on machines without a GPU; graphs, virtual memory and NCCL are then unavailable
and the capabilities say so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from xllm.backends.cuda import runtime
from xllm.backends.cuda import sampling as sampler
from xllm.backends.cuda.comm import TorchDistCommunicator
from xllm.backends.cuda.faults import is_fatal_cuda_error
from xllm.backends.cuda.graphs import CudaGraphRunner, EagerGraphRunner
from xllm.backends.cuda.streams import CudaEvent, CudaStream, HostEvent, HostStream
from xllm.hal import (
    FLOAT_DTYPES,
    AttentionMetadata,
    Backend,
    Capabilities,
    Communicator,
    Event,
    GraphInput,
    GraphRunner,
    MemInfo,
    NotSupportedError,
    SampleOutput,
    SamplingMetadata,
    Stream,
    XTensor,
)

_INTERPRET_CAPABILITIES = Capabilities(
    dtypes=FLOAT_DTYPES,
    shares_host_memory=True,  # the interpreter's tensors are host tensors
    graph_capture=False,
    virtual_memory=False,
    collective_backend="gloo",
    notes=("Triton interpreter on the host: kernels are exact but slow; no graphs, VMM or NCCL",),
)


class CudaBackend(Backend):
    name: ClassVar[str] = "cuda"
    device_type: ClassVar[str] = "cuda"
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        dtypes=FLOAT_DTYPES,
        graph_capture=True,
        virtual_memory=True,
        collective_backend="nccl",
    )
    # Test hook: launch the attention kernel with a deliberately wrong causal mask (see
    # kernels/attention.py). A subclass that sets it must be caught by the conformance suite.
    _attention_causal_border_bug: ClassVar[bool] = False

    def __init__(self, interpret: bool = False) -> None:
        self.interpret = bool(interpret)
        if self.interpret:
            # Sets TRITON_INTERPRET=1 in os.environ before the kernels are imported (triton reads
            # it then); a no-op if the caller already set it.
            reason = runtime.enable_interpreter()
            if reason is not None:
                raise RuntimeError(f"cuda backend cannot interpret its kernels: {reason}")
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
    def probe(cls, **options: object) -> str | None:
        # The one option: interpret=True runs the kernels in Triton's interpreter (no GPU needed).
        interpret = bool(options.pop("interpret", False))
        if options:
            return f"unknown options {sorted(options)} (cuda takes 'interpret')"
        if interpret:
            # Side effect: sets TRITON_INTERPRET=1 in os.environ if unset, because triton decides
            # interpreted vs compiled when the kernels are defined, which must come after this.
            return runtime.enable_interpreter()
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

    @property
    def capabilities(self) -> Capabilities:
        return _INTERPRET_CAPABILITIES if self.interpret else self.CAPABILITIES

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu") if self.interpret else torch.device("cuda", index)

    def _sm_count(self, device: torch.device) -> int:
        if self.interpret or device.type != "cuda":
            return 8  # arbitrary but fixed, so interpreted runs take the same split decisions
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._num_sms:
            self._num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._num_sms[index]

    # ------------------------------------------------------------------ ops

    def _rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self._k_rms_norm.rms_norm(x, weight, eps, residual, interpret=self.interpret)

    def _rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        neox_style: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k_rotary.rotary_embedding(
            positions, q, k, cos_sin_cache, neox_style, interpret=self.interpret
        )

    def _silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self._k_activation.silu_and_mul(x, interpret=self.interpret)

    def _gelu_and_mul(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return self._k_activation.gelu_and_mul(x, approximate, interpret=self.interpret)

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
            interpret=self.interpret,
            num_sms=self._sm_count(q.device),
            causal_border_bug=self._attention_causal_border_bug,
        )

    def _processed_logits(self, logits: torch.Tensor, sampling: SamplingMetadata) -> torch.Tensor:
        return sampler.processed_logits(logits, sampling)

    def _sample(self, logits: torch.Tensor, sampling: SamplingMetadata) -> SampleOutput:
        return sampler.sample(logits, sampling)

    # ------------------------------------------------------------------ memory

    def _mem_info(self, device_index: int) -> MemInfo:
        if self.interpret:
            page = os.sysconf("SC_PAGE_SIZE")
            return MemInfo(os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page)
        free, total = torch.cuda.mem_get_info(device_index)
        return MemInfo(int(free), int(total))

    def _create_xtensor(self, num_pages: int, page_size_bytes: int | None, device_index: int) -> XTensor:
        if self.interpret:
            raise NotSupportedError("cuda backend in interpret mode has no virtual-memory xTensor support")
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
        runner: type[GraphRunner] = EagerGraphRunner if self.interpret else CudaGraphRunner
        return runner(fn, inputs, self.device(device_index), capture_sizes, max_batch_size)

    # ------------------------------------------------------------------ streams

    def create_stream(self, device_index: int = 0) -> Stream:
        if self.interpret:
            return HostStream()
        return CudaStream(torch.cuda.Stream(device=self.device(device_index)))

    def create_event(self, enable_timing: bool = False) -> Event:
        return HostEvent(enable_timing) if self.interpret else CudaEvent(enable_timing)

    def current_stream(self, device_index: int = 0) -> Stream:
        if self.interpret:
            return HostStream()
        return CudaStream(torch.cuda.current_stream(self.device(device_index)))

    def synchronize(self, device_index: int = 0) -> None:
        if not self.interpret:
            torch.cuda.synchronize(self.device(device_index))

    # ------------------------------------------------------------------ comm

    def _create_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        if self.interpret:
            return TorchDistCommunicator(rank, world_size, init_method, "gloo", torch.device("cpu"))
        # One GPU per rank, the usual tensor-parallel layout within a node.
        device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        return TorchDistCommunicator(rank, world_size, init_method, "nccl", device)

    # ------------------------------------------------------------------ faults

    def _is_fatal_error(self, exc: BaseException) -> bool:
        # Sticky CUDA errors and lost GPUs (see faults.py); out of memory is not one of them.
        return is_fatal_cuda_error(exc)


__all__ = ["CudaBackend"]

"""`CpuBackend`: the reference implementation of the HAL contract, and the CPU runtime.

Every reference op is plain float32 torch (see ops.py, attention.py, and the HAL's
`sampling_ops`, whose reference sampling it runs as is), which makes ``CpuBackend(kernels=False)``
the oracle the accelerator backends are checked against by the conformance suite. As the runtime
of machines without an accelerator it runs, by default, fused C kernels for float32 (kernels.py)
where they apply and the plain ops elsewhere; the conformance suite checks those kernels against
the plain ops. Graphs replay eagerly, streams are the HAL's synchronous ones, xTensor pages are
real mmap pages and collectives go over gloo.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from xllm.backends.cpu import attention, linear, ops, quant_linear
from xllm.backends.cpu import kernels as _kernels
from xllm.backends.cpu.graphs import CPU_CAPTURE_SIZES, CpuGraphRunner
from xllm.backends.cpu.weights import on_huge_pages
from xllm.backends.cpu.xtensor import CpuXTensor
from xllm.hal import sampling_ops
from xllm.hal.backend import FLOAT_DTYPES, Backend, Capabilities
from xllm.hal.comm import Communicator
from xllm.hal.gloo import GlooCommunicator
from xllm.hal.graphs import EagerGraphRunner, GraphInput, GraphRunner
from xllm.hal.memory import MemInfo, XTensor, host_mem_info
from xllm.hal.metadata import AttentionMetadata, SampleOutput, SamplingMetadata
from xllm.hal.streams import Event, Stream, SyncEvent, SyncStreams

# ISA flags (as /proc/cpuinfo names them) that give bfloat16 / float16 arithmetic in hardware:
# x86 AVX512-BF16 or AMX-BF16, AVX512-FP16 or AMX-FP16; Arm's BF16 and half-precision SIMD.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "asimdhp"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags from /proc/cpuinfo ("flags" on x86, "Features" on Arm);
    empty where there is no such file, which then counts as float32-only."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_cpu_dtypes(flags: frozenset[str]) -> tuple[torch.dtype, ...]:
    """float32 always; bfloat16 / float16 only where the ISA computes them (else torch emulates
    them through float32 conversions, several times slower than float32 itself)."""
    native = [torch.float32]
    if flags & _BF16_FLAGS:
        native.append(torch.bfloat16)
    if flags & _FP16_FLAGS:
        native.append(torch.float16)
    return tuple(native)


class CpuBackend(Backend):
    name: ClassVar[str] = "cpu"
    device_type: ClassVar[str] = "cpu"
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        dtypes=FLOAT_DTYPES,
        shares_host_memory=True,
        # Buckets are recorded on first use, not captured up front (graphs.py): small ones replay
        # a program of the C kernels, larger ones (and every bucket without the kernels) re-run
        # the step eagerly.
        graph_capture=False,
        virtual_memory=True,  # xTensor pages are mmap/mprotect/madvise pages
        collective_backend="gloo",
        kv_cache_layout="NHD",
        notes=(
            "reference backend: float32 math, synchronous streams; fused C kernels and recorded "
            "decode graphs unless kernels=False",
        ),
    )

    def __init__(self, num_threads: int | None = None, kernels: bool | None = None) -> None:
        """`kernels`: run the fused C kernels where they apply (default: on unless the
        environment sets ``XLLM_CPU_KERNELS=0``); off, every op is the plain reference."""
        # Which half-precision dtypes are native depends on the host, so it is read at run time
        # (once: every op's argument check reads the capabilities).
        self._capabilities = dataclasses.replace(
            self.CAPABILITIES, native_dtypes=native_cpu_dtypes(cpu_flags())
        )
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._streams = SyncStreams()
        if kernels is None:
            kernels = os.environ.get("XLLM_CPU_KERNELS", "1") != "0"
        self.kernels = None
        if kernels and _kernels.available():
            self.kernels = _kernels

    # ------------------------------------------------------------------ identity

    @classmethod
    def probe(cls, **options: object) -> str | None:
        return None  # torch always runs on the CPU

    @classmethod
    def device_count(cls) -> int:
        return 1

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # ------------------------------------------------------------------ ops

    def _rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.kernels is not None and (out := self.kernels.rms_norm(x, weight, eps, residual)) is not None:
            return out
        return ops.rms_norm(x, weight, eps, residual)

    def _rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        neox_style: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernels is not None:
            out = self.kernels.rotary(positions, q, k, cos_sin_cache, neox_style)
            if out is not None:
                return out
        return ops.rotary_embedding(positions, q, k, cos_sin_cache, neox_style)

    def _embedding(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and (out := self.kernels.embedding(input_ids, weight)) is not None:
            return out
        return super()._embedding(input_ids, weight)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernels is not None and (out := self.kernels.linear(x, weight, bias)) is not None:
            return out
        return linear.linear(x, weight, bias)

    def _linear_int8(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
    ) -> torch.Tensor:
        out = quant_linear.linear_int8(x, qweight, scales, bias, group_size)
        if out is None:  # no kernel here, or a case it does not take: the HAL's reference
            return super()._linear_int8(x, qweight, scales, bias, group_size)
        return out

    def _silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and (out := self.kernels.silu_and_mul(x)) is not None:
            return out
        return ops.silu_and_mul(x)

    def _gelu_and_mul(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return ops.gelu_and_mul(x, approximate)

    def _reshape_and_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if self.kernels is None or not self.kernels.cache_write(k, v, k_cache, v_cache, slot_mapping):
            ops.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        decode = self.kernels.paged_decode if self.kernels is not None else None
        return attention.paged_attention(q, k_cache, v_cache, metadata, decode)

    def _processed_logits(self, logits: torch.Tensor, sampling: SamplingMetadata) -> torch.Tensor:
        return sampling_ops.processed_logits(logits, sampling)

    def _sample(self, logits: torch.Tensor, sampling: SamplingMetadata) -> SampleOutput:
        return sampling_ops.sample(logits, sampling)

    # ------------------------------------------------------------------ memory

    def _mem_info(self, device_index: int) -> MemInfo:
        return host_mem_info()

    def _create_xtensor(self, num_pages: int, page_size_bytes: int | None, device_index: int) -> XTensor:
        return CpuXTensor(num_pages, page_size_bytes)

    # ------------------------------------------------------------------ memory

    def place_weights(self, tensors: dict[str, Any], device_index: int = 0) -> dict[str, Any]:
        return on_huge_pages(tensors)

    # ------------------------------------------------------------------ graphs

    def _create_graph_runner(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        capture_sizes: Sequence[int] | None,
        max_batch_size: int | None,
        device_index: int,
    ) -> GraphRunner:
        if self.kernels is not None:
            return CpuGraphRunner(
                fn,
                inputs,
                self.device(device_index),
                capture_sizes or CPU_CAPTURE_SIZES,
                max_batch_size,
                own_ops=self._runs_own_ops,
            )
        return EagerGraphRunner(fn, inputs, self.device(device_index), capture_sizes, max_batch_size)

    # Ops a recorded decode step runs as C kernels: replaced in Python, they must run eagerly.
    _RECORDED_OPS = (
        "_embedding",
        "_rms_norm",
        "_rotary_embedding",
        "_linear",
        "_linear_int8",
        "_silu_and_mul",
        "_gelu_and_mul",
        "_reshape_and_cache",
        "_attention",
    )

    def _runs_own_ops(self) -> bool:
        own = vars(self)
        for name, op in _OWN_OPS.items():
            if getattr(type(self), name) is not op:
                return False
            # An instance attribute may be the op's own bound method (a patch put back).
            if name in own and getattr(own[name], "__func__", None) is not op:
                return False
        return True

    # ------------------------------------------------------------------ streams

    def create_stream(self, device_index: int = 0) -> Stream:
        return self._streams.create()

    def create_event(self, enable_timing: bool = False) -> Event:
        return SyncEvent(enable_timing)

    def current_stream(self, device_index: int = 0) -> Stream:
        return self._streams.current()

    def synchronize(self, device_index: int = 0) -> None:
        pass  # CPU ops complete before they return

    # ------------------------------------------------------------------ comm

    def _create_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        return GlooCommunicator(rank, world_size, init_method)


# The ops as this module defined them: a later patch of the class itself (a fault injected into
# every instance) is told apart from them too.
_OWN_OPS = {name: CpuBackend.__dict__[name] for name in CpuBackend._RECORDED_OPS}

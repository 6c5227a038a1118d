"""`AscendBackend`: the HAL on Huawei Ascend NPUs through torch_npu and CANN.

Ops go to torch_npu's fused operators as listed in `op_mapping` (the single table of operator
names and argument translations); the metadata translation lives in `translation` (pure Python,
unit-tested anywhere) and the torch paths that run where no fused operator fits in `torch_ops`.
Streams, ACL graphs and HCCL come from `runtime`, the ACL virtual-memory xTensor from `acl`.

torch_npu is imported when the backend is constructed, never at module import, so `xllm
backends` can list this backend on machines without it and say why it is unavailable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, ClassVar

import torch

from xllm.backends.ascend import op_mapping
from xllm.backends.ascend import probe as probe_mod
from xllm.backends.ascend.acl import AclRuntime, AclXTensor, torch_npu_tensor_factory
from xllm.backends.ascend.faults import is_fatal_npu_error
from xllm.backends.ascend.runtime import (
    HcclCommunicator,
    NpuEvent,
    NpuGraphRunner,
    NpuStream,
    flag_scope,
    npu_namespace,
)
from xllm.backends.ascend.translation import (
    FiaArgs,
    fia_args,
    split_by_kind,
)
from xllm.hal import sampling_ops
from xllm.hal.backend import FLOAT_DTYPES, Backend, Capabilities
from xllm.hal.comm import Communicator
from xllm.hal.errors import NotSupportedError
from xllm.hal.graphs import GraphInput, GraphRunner
from xllm.hal.memory import MemInfo, XTensor
from xllm.hal.metadata import AttentionMetadata, SampleOutput, SamplingMetadata
from xllm.hal.streams import Event, Stream


class AscendBackend(Backend):
    name: ClassVar[str] = "ascend"
    device_type: ClassVar[str] = "npu"
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        dtypes=FLOAT_DTYPES,
        graph_capture=True,
        virtual_memory=True,
        collective_backend="hccl",
        kv_cache_layout="NHD",
        notes=(
            "attention: npu_fused_infer_attention_score (fp16/bf16); float32 and graph capture use a torch path",
            "sampling: torch ops on the NPU; one host-drawn uniform per row (same draws as the CPU reference)",
        ),
    )

    def __init__(
        self, split_mixed_batches: bool = False, npu_module: ModuleType | None = None, **options: object
    ) -> None:
        """`split_mixed_batches`: one FIA call per run of decodes / prefill chunks instead of one
        call per batch (vllm-ascend splits this way on chips whose FIA rejects mixed TND batches).
        `npu_module`: an already imported torch_npu (or, in tests, a stand-in exposing the
        documented operators); by default torch_npu is imported here."""
        if options:
            raise TypeError(f"AscendBackend got unknown options {sorted(options)}")
        self.npu: ModuleType = npu_module if npu_module is not None else probe_mod.import_torch_npu()
        self.ns = npu_namespace(self.npu)
        self.split_mixed_batches = bool(split_mixed_batches)
        self._capturing = False  # True while NpuGraphRunner records a graph
        # FIA calls planned for the metadata of the current step, per layer shape (see _fia_calls).
        self._fia_metadata: AttentionMetadata | None = None
        self._fia_plans: dict[tuple[Any, ...], list[tuple[slice, slice, FiaArgs]]] = {}
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._acl: AclRuntime | None = None

    # ------------------------------------------------------------------ identity

    @classmethod
    def probe(cls, **options: object) -> str | None:
        return probe_mod.probe_reason()

    @classmethod
    def device_count(cls) -> int:
        if probe_mod.probe_reason() is not None:
            return 0
        return probe_mod.npu_device_count()

    # ------------------------------------------------------------------ ops

    def _rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return op_mapping.rms_norm(self.npu, x, weight, eps, residual)

    def _rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        neox_style: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return op_mapping.rotary_embedding(self.npu, positions, q, k, cos_sin_cache, neox_style)

    def _silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return op_mapping.silu_and_mul(self.npu, x)

    def _gelu_and_mul(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        return op_mapping.gelu_and_mul(x, approximate)

    def _reshape_and_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if self._capturing:
            self._reshape_and_cache_capturable(k, v, k_cache, v_cache, slot_mapping)
            return
        # No host read of the slots: skipped rows are redirected on the device (see op_mapping).
        op_mapping.reshape_and_cache(self.npu, k, v, k_cache, v_cache, slot_mapping)

    @staticmethod
    def _reshape_and_cache_capturable(
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Inside an ACL graph the skipped rows cannot be found on the host, so every row writes:
        a skipped row (slot < 0) rewrites slot 0 with its current contents. Padding rows of a
        graph bucket sit on block 0 (the engine's null block), so no real token shares slot 0."""
        valid = (slot_mapping >= 0).view(-1, 1, 1)
        idx = slot_mapping.clamp(min=0).to(torch.int64)
        for new, cache in ((k, k_cache), (v, v_cache)):
            flat = cache.view(-1, *cache.shape[2:])
            flat.index_copy_(0, idx, torch.where(valid, new, flat[0].unsqueeze(0)))

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
        if self._capturing or q.dtype not in op_mapping.FUSED_DTYPES:
            return op_mapping.torch_attention(q, k_cache, v_cache, md)
        num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        shape_key = (
            q.shape[1],
            num_kv_heads,
            block_size,
            md.scale,
            md.sliding_window,
            self.split_mixed_batches,
        )
        calls = self._fia_calls(md, shape_key)
        tables = md.block_tables.to(torch.int32)
        mask = self._causal_mask(q.device)
        if len(calls) == 1:
            return op_mapping.fused_attention(self.npu, q, k_cache, v_cache, tables, mask, calls[0][2])
        out = torch.empty_like(q)
        for tokens, rows, args in calls:
            out[tokens] = op_mapping.fused_attention(
                self.npu, q[tokens], k_cache, v_cache, tables[rows], mask, args
            )
        return out

    def _fia_calls(
        self, md: AttentionMetadata, shape_key: tuple[Any, ...]
    ) -> list[tuple[slice, slice, FiaArgs]]:
        """The FIA calls of this step for one layer shape, planned at the step's first layer.

        Every layer of a step gets the same metadata object (the engine builds a new one per
        step), so plans are kept per shape for that object only. Holding it keeps it alive, so
        a later step's metadata is never taken for it; nothing is read from the device.
        """
        if self._fia_metadata is not md:
            self._fia_metadata, self._fia_plans = md, {}
        calls = self._fia_plans.get(shape_key)
        if calls is None:
            calls = self._fia_plans[shape_key] = self._plan_fia_calls(md, shape_key)
        return calls

    @staticmethod
    def _plan_fia_calls(
        md: AttentionMetadata, shape_key: tuple[Any, ...]
    ) -> list[tuple[slice, slice, FiaArgs]]:
        """(token slice, sequence slice, FIA arguments) per operator call, from the metadata's
        host copies of the lengths (FIA takes them as host lists)."""
        num_heads, num_kv_heads, block_size, scale, window, split = shape_key
        qsl, seq_lens = md.host_query_start_loc(), md.host_seq_lens()
        common = dict(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            scale=scale,
            block_size=block_size,
            sliding_window=window,
        )
        if not split:
            return [(slice(0, qsl[-1]), slice(0, len(seq_lens)), fia_args(qsl, seq_lens, **common))]
        return [
            (
                slice(part.token_start, part.token_end),
                slice(part.seq_rows[0], part.seq_rows[-1] + 1),
                fia_args(part.query_start_loc, part.seq_lens, **common),
            )
            for part in split_by_kind(qsl, seq_lens)
        ]

    def _causal_mask(self, device: torch.device) -> torch.Tensor:
        if device not in self._masks:
            self._masks[device] = op_mapping.causal_mask(device)
        return self._masks[device]

    # Sampling is the HAL's reference (xllm.hal.sampling_ops), run with torch ops on the NPU:
    # torch_npu has no fused operator with the contract's penalty/top-k/top-p/min-p semantics,
    # and the host-drawn uniforms make the NPU pick the CPU reference's tokens.

    def _processed_logits(self, logits: torch.Tensor, sampling: SamplingMetadata) -> torch.Tensor:
        return sampling_ops.processed_logits(logits, sampling)

    def _sample(self, logits: torch.Tensor, sampling: SamplingMetadata) -> SampleOutput:
        return sampling_ops.sample(logits, sampling)

    # ------------------------------------------------------------------ memory

    def _mem_info(self, device_index: int) -> MemInfo:
        free, total = self.ns.mem_get_info(device_index)
        return MemInfo(free_bytes=int(free), total_bytes=int(total))

    def _create_xtensor(self, num_pages: int, page_size_bytes: int | None, device_index: int) -> XTensor:
        if self._acl is None:
            lib = probe_mod.load_acl_library()
            if lib is None:
                raise NotSupportedError(probe_mod.CANN_NOT_FOUND)
            self._acl = AclRuntime(lib)
        try:
            make_tensor = torch_npu_tensor_factory(self.npu)
        except AttributeError as exc:
            raise NotSupportedError(
                f"this torch_npu lacks the storage-from-pointer helpers xTensor views need: {exc}"
            ) from exc
        self.ns.set_device(device_index)  # ACL VMM calls act on the current device's context
        page = page_size_bytes or self._acl.granularity(device_index)
        return AclXTensor(self._acl, num_pages, page, device_index, make_tensor, self.device(device_index))

    # ------------------------------------------------------------------ graphs

    def _create_graph_runner(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        capture_sizes: Sequence[int] | None,
        max_batch_size: int | None,
        device_index: int,
    ) -> GraphRunner:
        return NpuGraphRunner(
            self.ns,
            lambda: flag_scope(self, "_capturing"),
            fn,
            inputs,
            self.device(device_index),
            capture_sizes,
            max_batch_size,
        )

    # ------------------------------------------------------------------ streams

    def create_stream(self, device_index: int = 0) -> Stream:
        return NpuStream(self.ns, self.ns.Stream(device=self.device(device_index)))

    def create_event(self, enable_timing: bool = False) -> Event:
        return NpuEvent(self.ns, enable_timing)

    def current_stream(self, device_index: int = 0) -> Stream:
        return NpuStream(self.ns, self.ns.current_stream(self.device(device_index)))

    def synchronize(self, device_index: int = 0) -> None:
        self.ns.synchronize(self.device(device_index))

    # ------------------------------------------------------------------ comm

    def _create_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        # One NPU per rank on a host; HCCL binds the communicator to the current device.
        device = self.device(rank % max(self.device_count(), 1))
        self.ns.set_device(device)
        return HcclCommunicator(rank, world_size, init_method, device)

    # ------------------------------------------------------------------ faults

    def _is_fatal_error(self, exc: BaseException) -> bool:
        # AI core exceptions, UCE/ECC memory errors, task aborts and lost devices, recognised by
        # torch_npu's wording and ACL error codes (see faults.py); torch_npu is not needed here.
        return is_fatal_npu_error(exc)

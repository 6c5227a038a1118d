"""The one place that says which torch_npu operator implements each HAL op, and how its arguments
are translated.

`OP_TABLE` is the readable summary (also printed in docs/PORTING.md and checked by a test to cover
every HAL op); the functions below it are the calls themselves. Each takes the imported
``torch_npu`` module as ``npu`` so this module imports nothing heavy and the backend decides when
torch_npu is loaded. Operator names and keyword conventions follow the torch_npu API reference
(Ascend Extension for PyTorch) and how vllm-ascend calls them; anything not verified on hardware
is listed in `OpMapping.unverified`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from xllm.backends.ascend import torch_ops
from xllm.backends.ascend.translation import FIA_COMPRESSED_MASK_SIZE, FIA_NO_LIMIT, FiaArgs
from xllm.hal.metadata import AttentionMetadata

FUSED_DTYPES = (torch.float16, torch.bfloat16)  # FIA and the ATB cache write take these only
ROTARY_MUL_MAX_DIM = 896  # npu_rotary_mul: D < 896 and B, N < 1000 (torch_npu API reference)
ROTARY_MUL_MAX_HEADS = 1000


@dataclass(frozen=True, slots=True)
class OpMapping:
    hal_op: str
    operator: str  # the torch_npu operator(s), or "torch" for plain torch ops on the NPU
    translation: str  # how HAL arguments become operator arguments
    fallback: str = ""  # when the fused operator is not used, and what runs instead
    unverified: tuple[str, ...] = field(default_factory=tuple)


OP_TABLE: dict[str, OpMapping] = {
    m.hal_op: m
    for m in (
        OpMapping(
            "rms_norm",
            "torch_npu.npu_rms_norm / torch_npu.npu_add_rms_norm",
            "npu_rms_norm(x, weight, epsilon=eps) -> (y, rstd): return y. With residual: "
            "npu_add_rms_norm(x, residual, weight, epsilon=eps) -> (y, rstd, x + residual): "
            "return (y, x + residual), the HAL's (normed, h).",
            "torch float32 formula when weight.dtype != x.dtype (the operator wants one dtype).",
        ),
        OpMapping(
            "rotary_embedding",
            "torch_npu.npu_rotary_mul",
            "cos/sin per token from cos_sin_cache[positions] (translation: torch_ops.rotary_cos_sin), "
            "widened to rot_dim; q/k[..., :rot_dim] in float32 as [1, T, H, rot_dim] (BSND); "
            "rotary_mode='half' for neox_style, 'interleave' for GPT-J; result cast back and copied "
            "into q/k in place.",
            "",
            ("rotary_mode='interleave' exists only in newer torch_npu releases",),
        ),
        OpMapping(
            "silu_and_mul", "torch_npu.npu_swiglu", "npu_swiglu(x, dim=-1): silu(x[..., :d]) * x[..., d:]."
        ),
        OpMapping(
            "gelu_and_mul",
            "torch",
            "F.gelu(gate.float(), approximate=approximate) * up.float(), cast to x.dtype "
            "(torch_npu has no fused GeGLU with the HAL's split convention).",
        ),
        OpMapping(
            "reshape_and_cache",
            "torch_npu._npu_reshape_and_cache",
            "_npu_reshape_and_cache(key=k, value=v, key_cache=kc, value_cache=vc, slot_indices=int32 slots); "
            "since the ATB operator documents no skip, rows with slot < 0 first repeat the first written row "
            "(same slot, same values) on the device, so no slot is read on the host.",
            "fp32 caches (ATB takes fp16/bf16/int8): index_copy_ into the flattened cache.",
            ("whether ATB ReshapeAndCache itself skips slot -1",),
        ),
        OpMapping(
            "attention",
            "torch_npu.npu_fused_infer_attention_score",
            "one TND call for the whole mixed batch: query [T, Hq, D]; key/value = caches viewed "
            "[num_blocks, block_size, Hkv*D]; block_table int32; actual_seq_lengths = query_start_loc[1:] "
            "(cumulative); actual_seq_lengths_kv = seq_lens (per sequence); num_heads, num_key_value_heads, "
            "scale, block_size; causal: sparse_mode=3 + 2048x2048 int8 upper-triangular atten_mask; "
            "window W: sparse_mode=4, pre_tokens=W-1, next_tokens=0 (translation: fia_args). "
            "split_mixed_batches=True issues one call per run of decodes / prefill chunks (split_by_kind).",
            "float32 and ACL graph capture: torch_ops.paged_attention (FIA takes fp16/bf16 only, and its "
            "host-side length lists would be frozen into a captured graph).",
            (
                "pre_tokens = W - 1 for a W-token window (vllm-ascend passes W); check with the conformance "
                "sliding-window case",
                "keyword 'scale' (older releases call it 'scale_value')",
            ),
        ),
        OpMapping(
            "processed_logits",
            "torch",
            "torch ops on the NPU: penalties -> temperature -> top-k -> top-p -> min-p (torch_ops).",
        ),
        OpMapping(
            "sample",
            "torch",
            "argmax for greedy rows; random rows: one U[0,1) per row drawn on the host from a generator "
            "seeded row_seed(seed, step) (translation: sampling_plan), then an inverse-CDF lookup "
            "(cumsum + searchsorted) on the NPU; logprobs from raw log_softmax.",
        ),
    )
}


# ---------------------------------------------------------------------------- calls


def rms_norm(
    npu: ModuleType, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if weight.dtype != x.dtype:
        hidden = x + residual if residual is not None else x
        h32 = hidden.to(torch.float32)
        normed = h32 * torch.rsqrt(h32.pow(2).mean(dim=-1, keepdim=True) + eps)
        out = (weight * normed.to(x.dtype)).to(x.dtype)
        return (out, hidden) if residual is not None else out
    if residual is None:
        y, _rstd = npu.npu_rms_norm(x, weight, epsilon=eps)
        return y
    # npu_add_rms_norm returns (y, rstd, x_sum) with x_sum = x1 + x2 in the input dtype: exactly
    # the HAL's h, so one fused call gives both outputs.
    y, _rstd, hidden = npu.npu_add_rms_norm(x, residual, weight, eps)
    return y, hidden


def rotary_embedding(
    npu: ModuleType,
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    rot_dim = cos_sin_cache.shape[1]
    cos, sin = torch_ops.rotary_cos_sin(cos_sin_cache, positions, neox_style)  # [T, 1, rot]
    if rot_dim >= ROTARY_MUL_MAX_DIM or max(q.shape[1], k.shape[1]) >= ROTARY_MUL_MAX_HEADS:
        # Outside npu_rotary_mul's documented limits (D < 896, N < 1000): same formula in torch.
        for x in (q, k):
            x[..., :rot_dim].copy_(
                torch_ops.rotary_mul(x[..., :rot_dim].to(torch.float32), cos, sin, neox_style)
            )
        return q, k
    cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)  # [1, T, 1, rot]: BSND with B=1
    mode = "half" if neox_style else "interleave"
    for x in (q, k):
        part = x[..., :rot_dim].to(torch.float32).contiguous().unsqueeze(0)  # float32, as the HAL asks
        rotated = npu.npu_rotary_mul(part, cos, sin, rotary_mode=mode)
        x[..., :rot_dim].copy_(rotated.squeeze(0))
    return q, k


def silu_and_mul(npu: ModuleType, x: torch.Tensor) -> torch.Tensor:
    return npu.npu_swiglu(x.contiguous(), dim=-1)  # fused ops take contiguous ND tensors


def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    gate, up = x.to(torch.float32).chunk(2, dim=-1)
    return (F.gelu(gate, approximate=approximate) * up).to(x.dtype)


def reshape_and_cache(
    npu: ModuleType,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes k/v row t into cache slot ``slot_mapping[t]``, skipping rows whose slot is < 0.

    The ATB operator documents no skip, and dropping those rows would need their indices on the
    host (a device read per layer). Instead each such row repeats the first row that is written:
    same slot, same values, so every slot passed is valid and duplicate writes agree. When no row
    is written, every row rewrites slot 0 with its current contents. All of it is device work.
    """
    if k_cache.shape[0] * k_cache.shape[1] > FIA_NO_LIMIT:
        raise ValueError(
            f"reshape_and_cache: {k_cache.shape[0] * k_cache.shape[1]} slots exceed the int32 slot indices "
            "of the operator"
        )
    valid = slot_mapping >= 0
    first = valid.to(torch.int32).argmax()  # the first written row (0 when there is none)
    rows = torch.where(valid, torch.arange(valid.shape[0], device=valid.device), first)
    slots = slot_mapping.index_select(0, rows)
    k, v = k.index_select(0, rows), v.index_select(0, rows)
    keep = (slots >= 0).view(-1, 1, 1)  # False on every row only when no row is written
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    k, v = torch.where(keep, k, flat_k[0]), torch.where(keep, v, flat_v[0])
    slots = slots.clamp(min=0)
    if k_cache.dtype in FUSED_DTYPES:
        npu._npu_reshape_and_cache(
            key=k.contiguous(),
            value=v.contiguous(),
            key_cache=k_cache,
            value_cache=v_cache,
            slot_indices=slots.to(torch.int32),
        )
        return
    idx = slots.to(torch.int64)
    flat_k.index_copy_(0, idx, k)
    flat_v.index_copy_(0, idx, v)


def causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed mask sparse modes 3/4 take: int8 [2048, 2048], 1 above the diagonal."""
    size = FIA_COMPRESSED_MASK_SIZE
    return torch.triu(torch.ones(size, size, dtype=torch.int8), diagonal=1).to(device)


def fused_attention(
    npu: ModuleType,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    mask: torch.Tensor,
    args: FiaArgs,
) -> torch.Tensor:
    """One FIA call over a TND batch; returns [T, Hq, D]."""
    num_blocks, block_size = k_cache.shape[:2]
    key = k_cache.view(num_blocks, block_size, -1)  # paged key in BBH: [blocks, block_size, Hkv*D]
    value = v_cache.view(num_blocks, block_size, -1)
    kwargs: dict[str, Any] = args.as_kwargs()
    if _FIA_SCALE_KEYWORD[0] != "scale":
        kwargs[_FIA_SCALE_KEYWORD[0]] = kwargs.pop("scale")
    try:
        out, _lse = npu.npu_fused_infer_attention_score(
            q.contiguous(), key, value, atten_mask=mask, block_table=block_tables, **kwargs
        )
    except TypeError as exc:
        # torch_npu releases before 7.0 named the softmax scale `scale_value`; switch once.
        if _FIA_SCALE_KEYWORD[0] != "scale" or "scale" not in str(exc):
            raise
        _FIA_SCALE_KEYWORD[0] = "scale_value"
        return fused_attention(npu, q, k_cache, v_cache, block_tables, mask, args)
    return out.view(q.shape)


# The keyword this torch_npu uses for FIA's softmax scale, learnt on the first call.
_FIA_SCALE_KEYWORD = ["scale"]


def torch_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md: AttentionMetadata
) -> torch.Tensor:
    return torch_ops.paged_attention(q, k_cache, v_cache, md)

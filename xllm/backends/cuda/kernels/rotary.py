"""Rotary position embedding (RoPE, Su et al. 2021) applied in place to q and k, in Triton.

One program per token rotates every head of q and of k: it loads the token's cos/sin row once
from the ``[max_position, rot_dim]`` cache (cos in the first half, sin in the second, vLLM's
layout) and applies it to a [heads, rot_dim/2] tile. NeoX style pairs dim i with i + rot_dim/2
(Llama, Qwen); GPT-J style pairs 2i with 2i+1. Dims past rot_dim (partial rotary) are untouched.
The rotation is computed in float32 and rounded once to the tensor's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xllm.backends.cuda.kernels.common import cast


@triton.jit
def _rotate_heads(
    base_ptr,
    stride_h,
    num_heads,
    cos,
    sin,
    offs_i,
    i_ok,
    HEADS_PAD: tl.constexpr,
    ROT_HALF: tl.constexpr,
    NEOX: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    heads = tl.arange(0, HEADS_PAD)
    ok = (heads < num_heads)[:, None] & i_ok[None, :]
    if NEOX:
        first = offs_i
        second = offs_i + ROT_HALF
    else:
        first = offs_i * 2
        second = offs_i * 2 + 1
    p1 = base_ptr + heads[:, None] * stride_h + first[None, :]
    p2 = base_ptr + heads[:, None] * stride_h + second[None, :]
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=ok, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, cast(o1, base_ptr.dtype.element_ty, INTERPRET), mask=ok)
    tl.store(p2, cast(o2, base_ptr.dtype.element_ty, INTERPRET), mask=ok)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    num_q_heads,
    num_kv_heads,
    ROT_HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    QH_PAD: tl.constexpr,
    KH_PAD: tl.constexpr,
    NEOX: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_i = tl.arange(0, HALF_PAD)
    i_ok = offs_i < ROT_HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + ROT_HALF + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_qt,
        stride_qh,
        num_q_heads,
        cos,
        sin,
        offs_i,
        i_ok,
        QH_PAD,
        ROT_HALF,
        NEOX,
        INTERPRET,
    )
    _rotate_heads(
        k_ptr + token * stride_kt,
        stride_kh,
        num_kv_heads,
        cos,
        sin,
        offs_i,
        i_ok,
        KH_PAD,
        ROT_HALF,
        NEOX,
        INTERPRET,
    )


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    neox_style: bool,
    *,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hk, D] in place and returns them."""
    num_tokens = q.shape[0]
    rot_dim = cos_sin_cache.shape[1]
    if num_tokens == 0 or rot_dim == 0:
        return q, k
    # The kernel writes through strides (q and k are often views of one fused qkv projection)
    # but needs unit stride inside a head; otherwise rotate a copy and write it back.
    q_work = q if q.stride(-1) == 1 else q.contiguous()
    k_work = k if k.stride(-1) == 1 else k.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    _rotary_kernel[(num_tokens,)](
        positions,
        q_work,
        k_work,
        cs,
        q_work.stride(0),
        q_work.stride(1),
        k_work.stride(0),
        k_work.stride(1),
        cs.stride(0),
        q.shape[1],
        k.shape[1],
        ROT_HALF=rot_dim // 2,
        HALF_PAD=triton.next_power_of_2(rot_dim // 2),
        QH_PAD=triton.next_power_of_2(q.shape[1]),
        KH_PAD=triton.next_power_of_2(k.shape[1]),
        NEOX=neox_style,
        INTERPRET=interpret,
    )
    if q_work is not q:
        q.copy_(q_work)
    if k_work is not k:
        k.copy_(k_work)
    return q, k

"""reshape_and_cache: scatter the new tokens' K/V into the paged cache, in Triton.

One program per token copies its [num_kv_heads, head_dim] rows of K and V to block
``slot // block_size``, offset ``slot % block_size``. Slot -1 marks a token that has no cache slot
(graph padding rows) and is skipped, so padded batches need no special case.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    block_size,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        heads = tl.arange(0, HEADS_PAD)
        dims = tl.arange(0, DIM_PAD)
        ok = (heads < num_kv_heads)[:, None] & (dims < HEAD_DIM)[None, :]
        kv = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=ok)
        tl.store(
            k_cache_ptr + blk * stride_cb + off * stride_cs + heads[:, None] * stride_ch + dims[None, :],
            kv,
            mask=ok,
        )
        vv = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=ok)
        tl.store(
            v_cache_ptr + blk * stride_vcb + off * stride_vcs + heads[:, None] * stride_vch + dims[None, :],
            vv,
            mask=ok,
        )


def reshape_and_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    if k.shape[0] == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("reshape_and_cache: the KV cache's head_dim must be contiguous")
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    _reshape_and_cache_kernel[(k.shape[0],)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_cache.shape[1],
        num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
    )

"""Elementwise and cache ops of the CPU reference backend: RMSNorm, rotary embedding, gated
activations and the paged-cache write.

These define the numerics every accelerator backend is compared against, so each one is the
plain textbook formula in float32, vectorised with torch, and cast back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    # The residual add happens in x's dtype, exactly as Hugging Face's decoder layers do it, so
    # a bf16 model accumulates the same rounding here as in transformers.
    hidden = x + residual if residual is not None else x
    h32 = hidden.to(torch.float32)
    normed = h32 * torch.rsqrt(h32.pow(2).mean(dim=-1, keepdim=True) + eps)
    # HF LlamaRMSNorm: `weight * normed.to(input_dtype)`; the final cast keeps x's dtype when
    # the weight is stored in a wider dtype than the activations.
    out = (weight * normed.to(x.dtype)).to(x.dtype)
    return (out, hidden) if residual is not None else out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox_style: bool) -> None:
    """Rotates the first rot_dim dims of every head of x [T, H, head_dim] in place."""
    rot_dim = cos.shape[-1] * 2
    rot = x[..., :rot_dim].to(torch.float32)
    if neox_style:
        # Pairs (i, i + rot_dim/2): the rotate_half formulation of GPT-NeoX / Llama.
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        # GPT-J: adjacent pairs (2i, 2i+1), results interleaved back into place.
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x[..., :rot_dim].copy_(out)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, neox_style: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # [T, rot_dim] -> cos, sin each [T, 1, rot_dim/2], broadcast over heads.
    cos_sin = cos_sin_cache.index_select(0, positions.to(torch.int64)).to(torch.float32)
    cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
    _rotate(q, cos, sin, neox_style)
    _rotate(k, cos, sin, neox_style)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.to(torch.float32).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    gate, up = x.to(torch.float32).chunk(2, dim=-1)
    return (F.gelu(gate, approximate=approximate) * up).to(x.dtype)


def reshape_and_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    block_size = k_cache.shape[1]
    slots = slot_mapping.to(torch.int64)
    valid = slots >= 0
    if not bool(valid.all()):  # padding tokens carry slot -1 and write nothing
        slots, k, v = slots[valid], k[valid], v[valid]
    # (block, offset) indexing works on any cache strides, unlike a flattened view.
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v

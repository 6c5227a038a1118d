"""Fused RMSNorm with optional residual add, in Triton (one program per row).

Matches Hugging Face's ``LlamaRMSNorm`` bit for bit where the hardware allows: the residual add
happens in the input dtype (``h = x + residual`` rounded to x's dtype), the statistics and the
normalisation in float32, and the weight multiplies the normalised row *after* it is cast back to
the input dtype (``weight * normed.to(dtype)``), so each of the three roundings HF does happens
here too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xllm.backends.cuda.kernels.common import cast


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    h_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_h,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = cast(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
        tl.store(h_ptr + row * stride_h + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = cast(xf * inv_rms, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, cast(w * normed, out_ptr.dtype.element_ty, INTERPRET), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, hidden] view with a contiguous last dim (copies only if it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    interpret: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm(x)``, or ``(rms_norm(x + residual), x + residual)``; inputs are untouched."""
    hidden = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, hidden)
    if residual is not None:
        r2 = _rows(residual)
        h = torch.empty_like(out)
        h2 = h.view(-1, hidden)
    else:
        r2 = h2 = x2  # unused
    if x2.shape[0]:
        block = triton.next_power_of_2(hidden)
        # One row per program keeps the reduction in registers; wide rows get more warps.
        num_warps = min(16, max(1, block // 512))
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out2,
            h2,
            x2.stride(0),
            r2.stride(0),
            out2.stride(0),
            h2.stride(0),
            hidden,
            eps,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            INTERPRET=interpret,
            num_warps=num_warps,
        )
    if residual is not None:
        return out, h
    return out

"""Gated activations of the MLP (SwiGLU and GeGLU, Shazeer 2020), in Triton.

``out = act(x[..., :d]) * x[..., d:]``. Like Hugging Face's eager ``act_fn(gate) * up`` in the
model dtype, the activation is computed in float32 and rounded to the dtype, then the product is
computed in float32 and rounded again, so bf16/fp16 results match the reference exactly rather
than to within a rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xllm.backends.cuda.kernels.common import cast

ACT_SILU = 0
ACT_GELU_ERF = 1
ACT_GELU_TANH = 2


@triton.jit
def _gated_kernel(
    x_ptr, out_ptr, stride_x, stride_o, d, ACT: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:
        a = gate / (1.0 + tl.exp(-gate))
    elif ACT == 1:
        a = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        # tanh(y) = 1 - 2 / (exp(2y) + 1): exact for all y (saturates to +-1), and needs only exp,
        # which both the GPU backend and the interpreter have.
        y = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        a = 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
    a = cast(a, out_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, cast(a * up, out_ptr.dtype.element_ty, INTERPRET), mask=ok)


def gated_activation(x: torch.Tensor, act: int, interpret: bool) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, d)
    if x2.shape[0] and d:
        block = min(1024, triton.next_power_of_2(d))
        _gated_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out2, x2.stride(0), out2.stride(0), d, ACT=act, BLOCK=block, INTERPRET=interpret
        )
    return out


def silu_and_mul(x: torch.Tensor, *, interpret: bool) -> torch.Tensor:
    return gated_activation(x, ACT_SILU, interpret)


def gelu_and_mul(x: torch.Tensor, approximate: str, *, interpret: bool) -> torch.Tensor:
    return gated_activation(x, ACT_GELU_TANH if approximate == "tanh" else ACT_GELU_ERF, interpret)

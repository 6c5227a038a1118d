"""Small Triton helpers shared by the kernels.

`cast` exists because of the interpreter: it converts float32 to bfloat16 by *truncating* the
mantissa (NumPy has no bf16; triton's emulation drops the low 16 bits), while GPUs and torch round
to nearest even. Under the interpreter we round first, with the usual bit trick (add 0x7FFF plus
the lowest kept bit, then clear the low half), so the truncating cast becomes exact and interpreted
bf16 results match torch's bit for bit. On a GPU the branch is compiled out.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(x):
    """float32 -> the float32 nearest (ties to even) to it that bfloat16 can hold exactly."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``x.to(DTYPE)`` with round-to-nearest-even for bfloat16 also under the interpreter."""
    if INTERPRET and DTYPE == tl.bfloat16:
        return round_to_bf16(x.to(tl.float32)).to(DTYPE)
    else:
        return x.to(DTYPE)

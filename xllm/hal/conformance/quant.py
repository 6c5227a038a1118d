"""Case kind for `Backend.linear_int8`, the weight-only int8 (Q8_0) linear.

Inputs are int8 weights over the whole range (-128 included, though `quantize_int8` never makes
it) with positive float32 group scales, one group's scale zero (an all-zero group quantises so),
against the reference's dequantise-then-multiply: another backend's op, or the NumPy oracle's
float64 product with the weight rounded as the contract says. Shapes cover the paths a backend may
switch between: one decode row, a few rows (the CPU kernel's 4-row blocks and their remainder),
batches past its direct-kernel limit (its blocked GEMM path), and a group size that is not a
multiple of 16, which the CPU kernel does not read and hands to the reference path.
"""

from __future__ import annotations

from typing import Any

import torch

from xllm.hal.conformance.cases import DTYPES, Case, make_case, register_kind
from xllm.hal.conformance.compare import THRESHOLDS, Checker
from xllm.hal.conformance.inputs import generator, randn, to_device

# float32 as for `linear` (GPU GEMMs may run float32 through TF32); other dtypes the defaults.
THRESHOLDS.setdefault("linear_int8", {torch.float32: 2e-6})


def _build() -> list[Case]:
    # (tokens, in, out, bias, group_size, small)
    shapes = [
        (1, 64, 256, False, 32, True),
        (3, 128, 1024, True, 32, True),
        (6, 256, 512, False, 64, False),
        (25, 256, 512, True, 32, False),
        (64, 768, 1280, False, 128, False),
        (2, 96, 64, True, 24, False),
    ]
    return [
        make_case("linear_int8", dtype, small=small, T=t, n_in=n_in, n_out=n_out, bias=bias, gs=gs)
        for dtype in DTYPES
        for t, n_in, n_out, bias, gs, small in shapes
    ]


def _check(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    p, gen = case.p, generator(case.seed)
    n_in, n_out, gs = p["n_in"], p["n_out"], p["gs"]
    qweight = torch.randint(-128, 128, (n_out, n_in), generator=gen, dtype=torch.int8)
    # Scales as `quantize_int8` makes them for weights of std n_in ** -0.5: max|w| / 127.
    scales = torch.rand((n_out, n_in // gs), generator=gen, dtype=torch.float32) * (3 * n_in**-0.5 / 127)
    scales[0, -1] = 0.0
    data = {
        "x": randn(gen, (p["T"], n_in), case.dtype),
        "q": qweight,
        "s": scales,
        "b": randn(gen, (n_out,), case.dtype) if p["bias"] else None,
    }

    def call(side: Any, d: dict) -> Any:
        return side.linear_int8(d["x"], d["q"], d["s"], d["b"], gs)

    mine = to_device(data, backend.device())
    out = call(backend, mine)
    backend.synchronize()
    ref = call(reference, to_device(data, reference.device()))
    if out.dtype != case.dtype:
        chk.fail(f"out: dtype {out.dtype}, expected {case.dtype} like x")
    chk.close("out", out, ref)
    chk.exact("x unchanged", mine["x"], data["x"])
    chk.exact("qweight unchanged", mine["q"], data["q"])


register_kind(
    "linear_int8",
    _build,
    _check,
    description="weight-only int8 linear (per-group scales) vs the dequantised reference",
)

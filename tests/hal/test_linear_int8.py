"""`Backend.linear_int8`: argument checks, the Q8_0 format, the CPU kernel against the HAL's
dequantising reference on every path it takes, and the conformance kind (which must catch a
kernel that gets the per-group scales wrong)."""

from __future__ import annotations

import pytest
import torch

from xllm.backends.cpu import cbuild, quant_linear
from xllm.backends.cpu.backend import CpuBackend
from xllm.hal.backend import INT8_GROUP_SIZE, Backend, dequantize_int8, quantize_int8
from xllm.hal.conformance import NumpyReference, Status, build_cases, run_suite


def _weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen) * in_features**-0.5


def test_quantize_is_symmetric_round_to_nearest_per_group() -> None:
    w = _weight(8, 64)
    w[3, :32] = 0.0  # an all-zero group
    q, s = quantize_int8(w, 32)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == (8, 64) and s.shape == (8, 2)
    assert int(q.abs().max()) == 127  # each group's largest weight maps to +-127
    assert float(s[3, 0]) == 0.0 and not q[3, :32].any()
    groups = w.view(8, 2, 32)
    assert torch.allclose(s, groups.abs().amax(-1) / 127)
    err = (dequantize_int8(q, s, 32) - w).view(8, 2, 32).abs()
    assert bool((err <= s.unsqueeze(-1) / 2 + 1e-7).all())  # off by at most half a step


def test_quantize_rejects_a_width_that_is_not_a_multiple_of_the_group() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int8(torch.zeros(4, 48), 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"qweight": torch.zeros(16, 64)}, "'qweight' must have dtype in \\(int8\\)"),
        ({"scales": torch.zeros(16, 2, dtype=torch.float16)}, "'scales' must have dtype in \\(float32\\)"),
        ({"scales": torch.zeros(16, 4)}, "'scales' has shape \\(16, 4\\), expected \\(16, 2\\)"),
        ({"group_size": 48}, "'group_size' must be a positive divisor of the 64"),
        ({"group_size": 0}, "'group_size' must be a positive divisor"),
        ({"bias": torch.zeros(15)}, "'bias' has length 15, expected 16"),
        ({"x": torch.zeros(2, 32)}, "'qweight' has input features 64, expected 32"),
    ],
)
def test_bad_arguments_fail_with_the_op_and_argument_named(change: dict, message: str) -> None:
    args = {
        "x": torch.zeros(2, 64),
        "qweight": torch.zeros(16, 64, dtype=torch.int8),
        "scales": torch.zeros(16, 2),
        "bias": None,
        "group_size": 32,
    }
    args.update(change)
    with pytest.raises(ValueError, match="linear_int8: argument " + message):
        CpuBackend().linear_int8(**args)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 24, 25, 64])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_cpu_kernel_matches_the_dequantising_reference(rows: int, group_size: int) -> None:
    backend = CpuBackend()
    q, s = quantize_int8(_weight(272, 256, seed=rows), group_size)
    gen = torch.Generator().manual_seed(rows + group_size)
    x = torch.randn(rows, 256, generator=gen)
    bias = torch.randn(272, generator=gen)
    want = Backend._linear_int8(backend, x, q, s, bias, group_size)  # the HAL default
    got = backend.linear_int8(x, q, s, bias, group_size)
    assert got.shape == (rows, 272) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "isa_flags",
    [(), ("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
    ids=["native", "avx2", "plain-c"],
)
def test_every_simd_variant_of_the_kernel_matches_the_reference(
    isa_flags: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel source has an AVX-512, an AVX2/FMA and a plain C body; the host picks one, so
    the others are built here with the wider ISAs switched off (a no-op on hosts without them)."""
    monkeypatch.setattr(cbuild, "BASE_FLAGS", cbuild.BASE_FLAGS + isa_flags)
    quant_linear._library.cache_clear()
    try:
        if not quant_linear.available():
            pytest.skip("no C compiler here")
        q, s = quantize_int8(_weight(80, 192), 32)
        x = torch.randn(6, 192, generator=torch.Generator().manual_seed(3))  # a 4-row block and 2 more
        got = quant_linear.linear_int8(x, q, s, None, 32)
        want = Backend._linear_int8(CpuBackend(), x, q, s, None, 32)
        assert got is not None and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        quant_linear._library.cache_clear()  # later tests load the host's own build again


def test_cpu_gemm_path_over_several_weight_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the direct kernel's rows, blocks of weight rows are dequantised in turn: 50 rows per
    block over 272 rows leaves a short last block."""
    monkeypatch.setattr(quant_linear, "_BLOCK_BYTES", 4 * 256 * 50)
    backend = CpuBackend()
    q, s = quantize_int8(_weight(272, 256), 32)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(272, generator=torch.Generator().manual_seed(2))
    want = Backend._linear_int8(backend, x, q, s, bias, 32)
    assert torch.allclose(backend.linear_int8(x, q, s, bias, 32), want, rtol=1e-5, atol=1e-5)


def test_cpu_kernel_is_the_path_that_runs_for_float32() -> None:
    if not quant_linear.available():
        pytest.skip("no C compiler here: the CPU backend runs the reference path")
    q, s = quantize_int8(_weight(64, 64), INT8_GROUP_SIZE)
    x = torch.randn(1, 64)
    assert quant_linear.linear_int8(x, q, s, None, INT8_GROUP_SIZE) is not None
    # Cases the kernel does not take are handed back to the reference path.
    assert quant_linear.linear_int8(x.bfloat16(), q, s, None, INT8_GROUP_SIZE) is None
    assert quant_linear.linear_int8(x[:, :48], *quantize_int8(_weight(64, 48), 24), None, 24) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_uses_the_reference(dtype: torch.dtype) -> None:
    backend = CpuBackend()
    q, s = quantize_int8(_weight(32, 64), 32)
    x = torch.randn(3, 64).to(dtype)
    out = backend.linear_int8(x, q, s, None, 32)
    assert out.dtype == dtype
    assert torch.equal(out, torch.nn.functional.linear(x, dequantize_int8(q, s, 32).to(dtype)))


def test_conformance_kind_passes_on_cpu_against_numpy() -> None:
    cases = build_cases(filters=["linear_int8"])
    assert {c.dtype for c in cases} == {torch.float32, torch.bfloat16, torch.float16}
    assert {c.p["gs"] for c in cases} >= {24, 32, 64, 128}
    report = run_suite(CpuBackend(), NumpyReference(), cases)
    assert report.ok, [r.detail for r in report.failed()]


def test_conformance_kind_catches_per_row_scales() -> None:
    """A kernel that applied one scale per output row (the first group's) must fail."""

    class RowScaled(CpuBackend):
        def _linear_int8(self, x, qweight, scales, bias, group_size):
            per_row = scales[:, :1].expand_as(scales).contiguous()
            return super()._linear_int8(x, qweight, per_row, bias, group_size)

    report = run_suite(RowScaled(), NumpyReference(), build_cases("small", filters=["linear_int8"]))
    assert all(r.status is Status.FAIL for r in report.results), [r.status for r in report.results]

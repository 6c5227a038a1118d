"""The suite bites: a CPU backend with one op subtly wrong fails exactly the cases that exercise
the bug, and nothing else.

Two plausible kernel bugs: attention that ignores the sliding window (a missing mask term) and a
fused RMSNorm that drops the residual add. Each must fail every case that depends on the broken
feature, in every dtype, against both the NumPy oracle and the real CPU backend.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from xllm.backends.cpu.backend import CpuBackend
from xllm.hal import AttentionMetadata, get_backend
from xllm.hal.conformance import NumpyReference, Status, build_cases, run_suite


class WindowlessAttention(CpuBackend):
    """Attends to the whole context even when the metadata sets a sliding window."""

    name: ClassVar[str] = "cpu-windowless"

    def _attention(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata) -> torch.Tensor:
        return super()._attention(
            q, k, v, k_cache, v_cache, dataclasses.replace(metadata, sliding_window=None)
        )


class ResiduallessRmsNorm(CpuBackend):
    """Normalises x instead of x + residual (still returns the right residual sum)."""

    name: ClassVar[str] = "cpu-residualless"

    def _rms_norm(self, x, weight, eps, residual):
        if residual is None:
            return super()._rms_norm(x, weight, eps, None)
        return super()._rms_norm(x, weight, eps, None), x + residual


@pytest.fixture(scope="module")
def cases():
    return build_cases("all")


def _check_bites(backend, reference, cases, is_affected) -> None:
    report = run_suite(backend, reference, cases)
    by_name = {r.name: r for r in report.results}
    affected = {c.name for c in cases if is_affected(c)}
    assert affected, "the case list must exercise the feature"
    failed = {r.name for r in report.results if r.status == Status.FAIL}
    wrong = {
        r.name: (r.status.value, r.detail)
        for r in report.results
        if r.status not in (Status.PASS, Status.FAIL)
    }
    assert not wrong
    assert failed == affected, {
        "missed": sorted(affected - failed),
        "false alarms": {n: by_name[n].detail for n in failed - affected},
    }


@pytest.mark.parametrize("against", ["numpy", pytest.param("cpu", marks=pytest.mark.slow)])
def test_windowless_attention_fails_exactly_the_sliding_window_cases(cases, against) -> None:
    reference = NumpyReference() if against == "numpy" else get_backend("cpu")
    _check_bites(
        WindowlessAttention(), reference, cases, lambda c: c.op == "attention" and c.p["win"] is not None
    )


@pytest.mark.parametrize("against", ["numpy", pytest.param("cpu", marks=pytest.mark.slow)])
def test_residualless_rms_norm_fails_exactly_the_residual_cases(cases, against) -> None:
    reference = NumpyReference() if against == "numpy" else get_backend("cpu")
    _check_bites(ResiduallessRmsNorm(), reference, cases, lambda c: c.op == "rms_norm" and c.p["residual"])

"""The HAL conformance suite's small set against the CPU reference, op by op.

The whole-model case of the small set is `test_greedy_parity.py`'s job here (and the CLI's:
``xllm conformance --backend jax --against cpu``), so this file stays fast.
"""

from __future__ import annotations

import pytest
import torch
from xllm.hal.conformance import build_cases, run_suite

CASES = build_cases("small")


@pytest.mark.parametrize("op", sorted({c.op for c in CASES}))
def test_small_set_passes_against_cpu(op, jax_backend, cpu_backend):
    cases = [c for c in CASES if c.op == op]
    report = run_suite(jax_backend, cpu_backend, cases)
    bad = [f"{r.name}: {r.status.value} {r.detail}" for r in report.failed()]
    assert not bad, "\n".join(bad)
    if op != "xtensor":
        assert report.summary["pass"] == len(cases)


def test_declared_rounding_points_are_kept(jax_backend, cpu_backend):
    # XLA may otherwise drop RMSNorm's rounding to bfloat16 before the weight (see xla_flags.py).
    cases = [c for c in build_cases("all", ["rms_norm"]) if c.p["residual"] and c.dtype == torch.bfloat16]
    report = run_suite(jax_backend, cpu_backend, cases)
    assert [r.nmse for r in report.results] == [0.0] * len(cases)

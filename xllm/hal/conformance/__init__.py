"""The HAL conformance suite: every backend computes what the contract says, checked case by case.

Modelled on ggml's test-backend-ops: the cases are data (`build_cases`), each runs on the backend
under test and on a reference (another backend, usually the CPU one, or the independent float64
`NumpyReference`), and results are compared with NaN/inf checks, NMSE and max-abs error against
per-op, per-dtype thresholds (`compare.THRESHOLDS`). ``xllm conformance`` is the command-line face
of `run_suite`.
"""

from xllm.hal.conformance.cases import (
    DTYPES,
    Case,
    CaseKind,
    build_cases,
    get_kind,
    kinds,
    make_case,
    register_kind,
    unregister_kind,
)
from xllm.hal.conformance.compare import THRESHOLDS, Checker, nmse, threshold_for
from xllm.hal.conformance.numpy_ref import NumpyReference
from xllm.hal.conformance.runner import CaseResult, Report, Status, run_case, run_suite

__all__ = [
    "DTYPES",
    "THRESHOLDS",
    "Case",
    "CaseKind",
    "CaseResult",
    "Checker",
    "NumpyReference",
    "Report",
    "Status",
    "build_cases",
    "get_kind",
    "kinds",
    "make_case",
    "nmse",
    "register_kind",
    "run_case",
    "run_suite",
    "threshold_for",
    "unregister_kind",
]

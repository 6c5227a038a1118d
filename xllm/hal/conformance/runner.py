"""Runs conformance cases on a backend against a reference and gathers a `Report`.

Each case ends as PASS, FAIL (a comparison failed: the reasons are kept), SKIP (the backend or the
reference raised `NotSupportedError`, or the dtype is not in the backend's capabilities: ggml's
"not supported") or ERROR (any other exception, with its text). One bad case never stops the
run: a conformance report is most useful when it lists everything that is wrong at once.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch

from xllm.hal.conformance.cases import Case, dtype_name, get_kind
from xllm.hal.conformance.compare import Checker, threshold_for, thresholds_table
from xllm.hal.errors import NotSupportedError


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    ERROR = "ERROR"


@dataclass(slots=True)
class CaseResult:
    name: str
    op: str
    dtype: str
    status: Status
    nmse: float | None
    max_abs: float | None
    threshold: float
    detail: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        for key in ("nmse", "max_abs"):  # JSON has no inf
            if d[key] is not None and d[key] == float("inf"):
                d[key] = "inf"
        return d


@dataclass(slots=True)
class Report:
    backend: str
    against: str
    results: list[CaseResult] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, int]:
        counts = {s.value.lower(): 0 for s in Status}
        for r in self.results:
            counts[r.status.value.lower()] += 1
        counts["total"] = len(self.results)
        return counts

    @property
    def ok(self) -> bool:
        """True when nothing failed or errored (skips are fine: 'not supported' is honest)."""
        return not any(r.status in (Status.FAIL, Status.ERROR) for r in self.results)

    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status in (Status.FAIL, Status.ERROR)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "against": self.against,
            "summary": self.summary,
            "environment": self.environment,
            "thresholds": thresholds_table(),
            "cases": [r.as_dict() for r in self.results],
        }


def environment(backend: Any, reference: Any) -> dict[str, Any]:
    import numpy

    return {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(backend.device()),
        "reference_device": str(reference.device()) if reference is not None else None,
        "capabilities": backend.capabilities.as_dict(),
    }


def run_case(case: Case, backend: Any, reference: Any) -> CaseResult:
    threshold = threshold_for(case.op, case.dtype)
    result = CaseResult(case.name, case.op, dtype_name(case.dtype), Status.SKIP, None, None, threshold)
    start = time.perf_counter()
    try:
        kind = get_kind(case.op)
        if case.dtype is not None and case.dtype not in backend.capabilities.dtypes:
            result.detail = f"not supported: dtype {dtype_name(case.dtype)} not in backend capabilities"
            return result
        if kind.uses_reference and case.dtype is not None and case.dtype not in reference.capabilities.dtypes:
            result.detail = f"not supported by the reference: dtype {dtype_name(case.dtype)}"
            return result
        checker = Checker(threshold)
        kind.check(case, backend, reference, checker)
        result.nmse, result.max_abs = checker.nmse, checker.max_abs
        result.status = Status.PASS if checker.ok else Status.FAIL
        result.detail = "; ".join(checker.failures)
    except NotSupportedError as exc:
        result.status, result.detail = Status.SKIP, f"not supported: {exc}"
    except Exception as exc:  # noqa: BLE001 - reported per case, the run goes on
        result.status, result.detail = Status.ERROR, f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = round(time.perf_counter() - start, 4)
    return result


def run_suite(
    backend: Any,
    reference: Any,
    cases: Sequence[Case],
    on_result: Callable[[CaseResult], None] | None = None,
) -> Report:
    """Runs every case on `backend` against `reference` (a Backend or a `NumpyReference`)."""
    report = Report(
        backend=getattr(backend, "name", type(backend).__name__),
        against=getattr(reference, "name", type(reference).__name__),
        environment=environment(backend, reference),
    )
    for case in cases:
        result = run_case(case, backend, reference)
        report.results.append(result)
        if on_result is not None:
            on_result(result)
    return report

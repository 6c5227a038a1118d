"""`xllm conformance`: run the HAL conformance suite on a backend and print one row per case.

The backend under test is compared against the CPU reference backend or the independent NumPy
oracle (the default for ``--backend cpu``; comparing a backend with itself is refused because it
proves nothing). The whole-model greedy-decode cases (``--filter model``, from `xllm.conformance`)
run through the engine and, against ``numpy``, take Hugging Face transformers as their oracle.
Exit status: 0 when every case passed or was skipped as not supported, 1 on any failure or error,
2 when the backend is unknown or cannot run here (with the reason).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from xllm.cli.main import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "conformance",
        help="check a backend's ops against the CPU reference or the NumPy oracle",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--backend", required=True, help="backend under test (see `xllm backends`)")
    p.add_argument(
        "--against",
        default=None,
        help="reference: 'numpy' (float64 oracle) or a backend name; default 'cpu', or 'numpy' for --backend cpu",
    )
    p.add_argument("--json", metavar="PATH", help="also write the full report as JSON to PATH")
    p.add_argument(
        "--filter",
        action="append",
        metavar="OP_OR_SUBSTRING",
        help="run only cases of this op or whose name contains it (repeatable)",
    )
    p.add_argument(
        "--interpret",
        action="store_true",
        help="run Triton kernels in the interpreter on CPU tensors (get_backend(NAME, interpret=True))",
    )
    p.add_argument(
        "--size",
        choices=("small", "all"),
        default=None,
        help="case set: 'small' (minutes under --interpret) or 'all'; default small with --interpret, else all",
    )
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.set_defaults(func=run)


def _open_backend(name: str, options: dict[str, Any]) -> Any:
    from xllm.hal import BackendUnavailableError, UnknownBackendError, get_backend

    try:
        return get_backend(name, **options)
    except (UnknownBackendError, BackendUnavailableError) as exc:
        raise CLIError(str(exc), code=2) from exc
    except TypeError as exc:  # the backend's constructor does not take an option, e.g. interpret
        raise CLIError(f"backend {name!r} does not accept options {sorted(options)}: {exc}", code=2) from exc


def _cpu_kernels_available() -> bool:
    from xllm.backends.cpu import kernels

    return kernels.available()


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.2e}"


def run(args: argparse.Namespace) -> int:
    # The whole-model decode kind lives above the engine, in xllm.conformance (the HAL must not
    # import it); it is registered for this run only, so callers of main() in one process see no
    # lasting change.
    from xllm.conformance import kinds_registered

    with kinds_registered():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from xllm.hal.conformance import NumpyReference, build_cases, run_suite

    size = args.size or ("small" if args.interpret else "all")
    against = args.against or ("numpy" if args.backend == "cpu" else "cpu")
    # The cpu reference is the CPU backend's plain torch ops; `--backend cpu --against cpu` checks
    # its fused kernels against them, which only proves something where the kernels run.
    if against == args.backend and not (against == "cpu" and _cpu_kernels_available()):
        raise CLIError(
            f"comparing backend {args.backend!r} with itself proves nothing; use --against numpy"
            + ("" if args.backend == "cpu" else " or --against cpu"),
            code=2,
        )
    cases = build_cases(size, args.filter)
    if not cases:
        raise CLIError(f"no conformance case matches --filter {args.filter} (size {size})", code=2)
    if args.list:
        for case in cases:
            print(case.name)
        return 0

    options: dict[str, Any] = {}
    if args.interpret:
        # Triton reads this when kernels are defined; set it before the backend imports them.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        options["interpret"] = True
    backend = _open_backend(args.backend, options)
    reference_options = {"kernels": False} if against == "cpu" else {}
    reference = NumpyReference() if against == "numpy" else _open_backend(against, reference_options)

    width = max(len(c.name) for c in cases)
    header = f"{'CASE':<{width}}  {'NMSE':>9}  {'MAX-ABS':>9}  {'THRESHOLD':>9}  STATUS"
    print(f"xllm conformance: {args.backend} ({backend.device()}) against {against}, {len(cases)} cases")
    if against == "numpy" and any(c.op == "model" for c in cases):
        print("model cases: NumPy has no model; Hugging Face transformers is their oracle")
    print(header)

    def show(result: Any) -> None:
        print(
            f"{result.name:<{width}}  {_fmt(result.nmse):>9}  {_fmt(result.max_abs):>9}  "
            f"{result.threshold:>9.0e}  {result.status.value}",
            flush=True,
        )
        if result.detail and result.status.value != "PASS":
            print(f"    {result.detail}", flush=True)

    start = time.perf_counter()
    report = run_suite(backend, reference, cases, on_result=show)
    elapsed = time.perf_counter() - start
    s = report.summary
    print(
        f"{args.backend} vs {against}: {s['pass']} passed, {s['fail']} failed, {s['skip']} skipped "
        f"(not supported), {s['error']} errors, {s['total']} cases in {elapsed:.1f} s"
    )
    if args.json:
        doc = report.as_dict()
        doc["options"] = {"size": size, "filters": args.filter or [], "interpret": bool(args.interpret)}
        doc["summary"]["seconds"] = round(elapsed, 3)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"report written to {args.json}", file=sys.stderr)
    return 0 if report.ok else 1

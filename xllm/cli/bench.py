"""`xllm bench throughput|serve`: benchmarks that print ratios against a baseline from the same run."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "throughput": (
        "xllm.bench.throughput",
        "offline throughput against transformers, llama.cpp and vLLM on the same workload",
    ),
    "serve": ("xllm.bench.serve", "drive an OpenAI-compatible server with streaming requests"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark")
    sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        bp = sub.add_parser(name, help=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)

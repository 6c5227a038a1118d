"""Engine flags shared by `xllm generate`, `xllm serve` and `xllm bench throughput`."""

from __future__ import annotations

import argparse


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model", default=None, help="Hugging Face checkpoint directory (default: the embedded model)"
    )
    g.add_argument(
        "--backend", default=None, help="backend name (default: $XLLM_BACKEND or the first available)"
    )
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument(
        "--kv-cache-memory", default=None, help="KV-cache bytes, e.g. 2GiB (default: sized automatically)"
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="on an accelerator, the fraction of device memory for weights, activations and the KV "
        "cache, sized after a profiling pass at the largest batch (default 0.9; ignored on the CPU "
        "and when --kv-cache-memory is given)",
    )
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=4096)
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument(
        "--no-graphs", action="store_true", help="run decode steps eagerly instead of graph replay"
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--max-consecutive-step-failures",
        type=int,
        default=3,
        help="stop the engine (and exit `xllm serve` with status 1) after this many failed model "
        "steps in a row; an error the backend calls fatal stops it at once (default 3)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return {
        "model": args.model,
        "backend": args.backend,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "block_size": args.block_size,
        "kv_cache_memory": args.kv_cache_memory,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": not args.no_prefix_caching,
        "use_graphs": not args.no_graphs,
        "seed": args.seed,
        "max_consecutive_step_failures": args.max_consecutive_step_failures,
    }

"""`xllm bench serve --workload mixed|shared-prefix`: the cluster's two placement questions.

**mixed** (online/offline co-location). The same online workload (``--num-prompts`` streaming
requests at ``--request-rate``) runs three times, each with fresh prompts so no run warms the
prefix cache for the next: alone; beside an offline flood (``--offline-concurrency`` requests kept
in flight at priority 1, vLLM's ``priority`` field); and beside the same flood sent at priority 0,
which is what serving both from one pool without classes looks like. The report puts the online
TTFT/TPOT percentiles next to the offline throughput each run achieved: co-location works when the
second row's online p99 TTFT stays near the first's while offline tokens still flow.

**shared-prefix** (cache-aware placement). Prompts are one of ``--prefix-groups`` long shared
prefixes (``--prefix-len`` tokens) plus a short random suffix, in shuffled order. The prefix hit
rate is measured from the responses' ``usage.prompt_tokens_details.cached_tokens``. With
``--compare-policies cache_aware,round_robin`` against an xllm router, the run repeats once per
policy (the router's ``PUT /cluster/policy`` switches it; every run gets new prefixes, so every
run starts with cold caches) and the report compares hit rate and TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
from typing import Any

from xllm.bench.serve import (
    RequestResult,
    Target,
    compute_metrics,
    drive,
    http_client,
    load_tokenizer,
    open_target,
    parse_slo,
    random_prompt,
)


async def _drive_online(
    target: Target, args: argparse.Namespace, prompts: list[str], rng: random.Random
) -> tuple[list[RequestResult], float]:
    """The run's online requests, at the command line's rate and concurrency (no progress bar)."""
    return await drive(
        target, prompts, args.output_len, args.input_len, args.request_rate, args.max_concurrency, rng, False
    )


def _online_row(
    name: str, results: list[RequestResult], duration: float, slo: dict[str, float]
) -> dict[str, Any]:
    m = compute_metrics(results, duration, slo)
    return {"run": name, **{k: m[k] for k in _ONLINE_KEYS}, "slo_goodput": m["request_goodput"]}


_ONLINE_KEYS = (
    "completed",
    "failed",
    "duration",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "p99_tpot_ms",
    "output_throughput",
)


async def _offline_flood(
    target: Target, args: argparse.Namespace, priority: int, stop: asyncio.Event, out: list
):
    """Keeps `--offline-concurrency` offline requests in flight until `stop`; completed ones go to `out`."""
    rng = random.Random(args.seed + 7919 * (priority + 1))
    output_len = args.offline_output_len or args.output_len

    async def worker() -> None:
        while not stop.is_set():
            prompt = random_prompt(rng, args.input_len)
            request = asyncio.ensure_future(
                target.request(prompt, output_len, args.input_len, priority=priority)
            )
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({request, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if request in done:
                out.append(request.result())
            else:  # the online run ended: what is unfinished is not counted (nor waited for)
                request.cancel()
            stopped.cancel()

    await asyncio.gather(*(worker() for _ in range(args.offline_concurrency)))


async def run_mixed(args: argparse.Namespace) -> dict[str, Any]:
    slo = parse_slo(args.slo)
    tokenizer = load_tokenizer(args)
    rows = []
    async with http_client(args, args.num_prompts + args.offline_concurrency) as client:
        target = await open_target(args, client)
        for run_index, (name, offline_priority) in enumerate(
            (
                ("online alone", None),
                ("online + offline (priority 1)", 1),
                ("online + offline (priority 0)", 0),
            )
        ):
            rng = random.Random(args.seed + run_index)
            prompts = [random_prompt(rng, args.input_len, tokenizer) for _ in range(args.num_prompts)]
            stop = asyncio.Event()
            offline: list[RequestResult] = []
            flood = None
            if offline_priority is not None:
                flood = asyncio.create_task(_offline_flood(target, args, offline_priority, stop, offline))
                await asyncio.sleep(1.0)  # let the flood fill the instances first
            results, duration = await _drive_online(target, args, prompts, rng)
            stop.set()
            if flood is not None:
                await flood
            row = _online_row(name, results, duration, slo)
            done = [r for r in offline if r.success]
            row["offline_completed"] = len(done)
            row["offline_output_throughput"] = sum(r.output_len for r in done) / max(duration, 1e-9)
            rows.append(row)
            print(f"{name}: online p99 TTFT {row['p99_ttft_ms']:.1f} ms", file=sys.stderr)
    return {"workload": "mixed", "model_id": target.model, "base_url": target.base_url, "runs": rows}


def _shared_prefix_prompts(args: argparse.Namespace, rng: random.Random, tokenizer: Any) -> list[str]:
    prefixes = [random_prompt(rng, args.prefix_len, tokenizer) for _ in range(args.prefix_groups)]
    prompts = [
        f"{prefixes[i % len(prefixes)]} {random_prompt(rng, args.input_len)}" for i in range(args.num_prompts)
    ]
    rng.shuffle(prompts)
    return prompts


async def _set_policy(target: Target, policy: str) -> None:
    r = await target.client.put(
        f"{target.base_url}/cluster/policy", json={"policy": policy}, headers=target.headers
    )
    if r.status_code != 200:
        raise RuntimeError(f"the router refused policy {policy!r}: HTTP {r.status_code} {r.text[:200]}")


async def run_shared_prefix(args: argparse.Namespace) -> dict[str, Any]:
    slo = parse_slo(args.slo)
    tokenizer = load_tokenizer(args)
    policies = [p.strip() for p in args.compare_policies.split(",")] if args.compare_policies else [None]
    rows = []
    async with http_client(args, args.max_concurrency or args.num_prompts) as client:
        target = await open_target(args, client)
        for run_index, policy in enumerate(policies):
            if policy is not None:
                await _set_policy(target, policy)
            rng = random.Random(args.seed + 104729 * (run_index + 1))  # new prefixes: cold caches
            prompts = _shared_prefix_prompts(args, rng, tokenizer)
            results, duration = await _drive_online(target, args, prompts, rng)
            row = _online_row(policy or "as configured", results, duration, slo)
            ok = [r for r in results if r.success]
            prompt_tokens = sum(r.prompt_len for r in ok)
            row["prefix_hit_rate"] = sum(r.cached_tokens for r in ok) / max(prompt_tokens, 1)
            rows.append(row)
    return {"workload": "shared-prefix", "model_id": target.model, "base_url": target.base_url, "runs": rows}


async def _set_roles(target: Target, roles: dict[str, str]) -> None:
    for instance_id, role in roles.items():
        r = await target.client.post(
            f"{target.base_url}/cluster/instances/{instance_id}/role",
            json={"role": role},
            headers=target.headers,
        )
        if r.status_code != 200:
            raise RuntimeError(
                f"the router could not switch {instance_id} to {role}: HTTP {r.status_code} {r.text[:200]}"
            )


async def run_pd(args: argparse.Namespace) -> dict[str, Any]:
    slo = parse_slo(args.slo)
    tokenizer = load_tokenizer(args)
    rows = []
    async with http_client(args, args.max_concurrency or args.num_prompts) as client:
        target = await open_target(args, client)
        r = await client.get(f"{target.base_url}/cluster/instances", headers=target.headers)
        r.raise_for_status()
        roles = {i["id"]: i["role"] for i in r.json()}
        split = {i: role for i, role in roles.items() if role in ("prefill", "decode")}
        if not ({"prefill", "decode"} <= set(split.values())):
            raise RuntimeError(
                f"the pd workload needs prefill and decode instances behind the router; it has {roles}"
            )
        try:
            for run_index, name in enumerate(("prefill/decode", "all mixed")):
                if run_index == 1:
                    await _set_roles(target, {i: "mixed" for i in split})
                rng = random.Random(args.seed + 7 * run_index)  # fresh prompts: no cache carried over
                prompts = [random_prompt(rng, args.input_len, tokenizer) for _ in range(args.num_prompts)]
                results, duration = await _drive_online(target, args, prompts, rng)
                m = compute_metrics(results, duration, slo)
                rows.append({"run": name, **m})
        finally:
            await _set_roles(target, split)
    return {"workload": "pd", "model_id": target.model, "base_url": target.base_url, "slo": slo, "runs": rows}


def format_runs(report: dict[str, Any]) -> str:
    runs = report["runs"]
    extra = {
        "mixed": [
            ("offline tok/s", "offline_output_throughput", ".1f"),
            ("offline done", "offline_completed", "d"),
        ],
        "shared-prefix": [("prefix hit rate", "prefix_hit_rate", ".1%")],
        "pd": [
            ("p90 TTFT ms", "p90_ttft_ms", ".1f"),
            ("p90 TPOT ms", "p90_tpot_ms", ".1f"),
            ("p99 TPOT ms", "p99_tpot_ms", ".1f"),
            ("goodput req/s", "request_goodput", ".2f"),
        ],
    }[report["workload"]]
    columns = [
        ("run", "run", "s"),
        ("ok", "completed", "d"),
        ("failed", "failed", "d"),
        ("mean TTFT ms", "mean_ttft_ms", ".1f"),
        ("p99 TTFT ms", "p99_ttft_ms", ".1f"),
        ("mean TPOT ms", "mean_tpot_ms", ".1f"),
        ("online tok/s", "output_throughput", ".1f"),
        *extra,
    ]
    widths = [max(len(title), *(len(format(r[key], fmt)) for r in runs)) for title, key, fmt in columns]
    lines = [f" {report['workload']} workload against {report['base_url']} ({report['model_id']}) "]
    lines.append("  ".join(title.ljust(w) for (title, _, _), w in zip(columns, widths, strict=True)))
    for r in runs:
        lines.append(
            "  ".join(format(r[key], fmt).ljust(w) for (_, key, fmt), w in zip(columns, widths, strict=True))
        )
    first = runs[0]
    for r in runs[1:]:
        if report["workload"] == "mixed":
            ratio = r["p99_ttft_ms"] / first["p99_ttft_ms"] if first["p99_ttft_ms"] else math.nan
            lines.append(f"{r['run']}: online p99 TTFT x{ratio:.2f} of online alone")
        elif report["workload"] == "pd":
            slo = (
                ",".join(f"{k}={v:g}" for k, v in report["slo"].items()) or "none given: every success counts"
            )
            lines.append(
                f"goodput at the SLO ({slo}): {first['run']} {first['request_goodput']:.2f} req/s, "
                f"{r['run']} {r['request_goodput']:.2f} req/s"
            )
        else:
            ratio = r["mean_ttft_ms"] / first["mean_ttft_ms"] if first["mean_ttft_ms"] else math.nan
            lines.append(
                f"{first['run']} vs {r['run']}: prefix hit rate {first['prefix_hit_rate']:.1%} vs "
                f"{r['prefix_hit_rate']:.1%}, mean TTFT {r['run']} / {first['run']} = {ratio:.2f}x"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from xllm.cli.main import CLIError

    if args.offline_concurrency < 1 or args.prefix_groups < 1 or args.prefix_len < 1:
        raise CLIError("--offline-concurrency, --prefix-groups and --prefix-len must be >= 1")
    if args.compare_policies and args.workload != "shared-prefix":
        raise CLIError("--compare-policies goes with --workload shared-prefix")
    runner = {"mixed": run_mixed, "shared-prefix": run_shared_prefix, "pd": run_pd}[args.workload]
    try:
        report = asyncio.run(runner(args))
    except Exception as exc:
        raise CLIError(f"benchmark failed: {type(exc).__name__}: {exc}", code=1) from exc
    print(format_runs(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(r["completed"] for r in report["runs"]) else 1

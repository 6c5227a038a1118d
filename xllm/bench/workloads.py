"""Named workloads of `xllm bench throughput`: the rows of the CPU comparison table (issue 15).

A workload is a list of prompts given as token ids plus one output length per prompt; every
engine under test receives exactly these ids and must produce exactly these many tokens (EOS
ignored, greedy), so their output tokens per second are comparable. Prompts are drawn from a
seeded generator over the vocabulary minus special tokens: the same arguments give the same
workload in every process, which is what lets a peer in a subprocess (vLLM) run the same one.

``startup`` is different: it measures process start to first token, so its "workload" is one
short prompt and one output token, run by launching a fresh process per engine.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A row definition: lengths are inclusive ranges; (n, n) means every prompt has length n."""

    name: str
    num_prompts: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    description: str
    startup: bool = False
    motif: int = 0  # > 0: each prompt is a random motif of this many tokens, repeated to length


WORKLOADS: dict[str, WorkloadSpec] = {
    "decode1": WorkloadSpec("decode1", 1, (32, 32), (64, 64), "batch-1 decode (32 in, 64 out)"),
    "batch64": WorkloadSpec("batch64", 64, (64, 64), (64, 64), "64 x (64 in, 64 out)"),
    "ragged64": WorkloadSpec("ragged64", 64, (32, 256), (16, 256), "64 ragged (in 32-256, out 16-256)"),
    # Speculative decoding's case: text that repeats itself, for n-gram prompt lookup to find.
    "repetitive": WorkloadSpec(
        "repetitive", 4, (96, 96), (128, 128), "4 x (96 in: a 12-token motif repeated, 128 out)", motif=12
    ),
    "startup": WorkloadSpec(
        "startup", 1, (8, 8), (1, 1), "process start to first token (fresh process)", startup=True
    ),
}


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    description: str = ""
    startup: bool = False

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def max_len(self) -> int:
        """Longest prompt plus output of any request: the context a peer must be sized for."""
        return max(len(p) + o for p, o in zip(self.prompts, self.output_lens, strict=True))


def spec_from_lengths(num_prompts: int, input_len: int, output_len: int, range_ratio: float) -> WorkloadSpec:
    """The ad-hoc workload of --num-prompts/--input-len/--output-len/--range-ratio."""

    def bounds(n: int) -> tuple[int, int]:
        return max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio)))

    return WorkloadSpec(
        "custom",
        num_prompts,
        bounds(input_len),
        bounds(output_len),
        f"{num_prompts} x ({input_len} in, {output_len} out, range ratio {range_ratio})",
    )


def make_workload(spec: WorkloadSpec, vocab_size: int, seed: int = 0, avoid: Iterable[int] = ()) -> Workload:
    """Draws the prompts and output lengths of `spec`; deterministic in (spec, vocab, seed, avoid)."""
    rng = random.Random(seed)
    excluded = set(avoid)
    ids = [t for t in range(vocab_size) if t not in excluded]
    if not ids:
        raise ValueError("no token ids left to draw prompts from")
    prompts: list[list[int]] = []
    outputs: list[int] = []
    for _ in range(spec.num_prompts):
        # Lengths first, then ids, per prompt: adding prompts does not change the earlier ones.
        n_in = rng.randint(*spec.input_len)
        n_out = rng.randint(*spec.output_len)
        if spec.motif:
            motif = [rng.choice(ids) for _ in range(spec.motif)]
            prompts.append([motif[i % spec.motif] for i in range(n_in)])
        else:
            prompts.append([rng.choice(ids) for _ in range(n_in)])
        outputs.append(n_out)
    return Workload(spec.name, prompts, outputs, spec.description, spec.startup)

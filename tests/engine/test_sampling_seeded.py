"""Seeded sampling is reproducible whatever else runs in the batch; seeds, n and penalties matter."""

from __future__ import annotations

import random

from xllm import SamplingParams

PROMPT = [17, 250, 33, 401, 98, 12, 77, 300, 5, 61, 222, 144]


def seeded(seed: int = 1234, **kw) -> SamplingParams:
    fields = dict(temperature=0.8, top_p=0.9, top_k=50, seed=seed, max_tokens=16, ignore_eos=True)
    fields.update(kw)
    return SamplingParams(**fields)


def random_batch(n: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Other traffic: varied lengths (some crossing blocks), temperatures, filters and penalties."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        prompts.append([rng.randrange(5, 512) for _ in range(rng.choice([1, 3, 15, 17, 40]))])
        params.append(
            SamplingParams(
                temperature=rng.choice([0.0, 0.5, 1.0, 1.5]),
                top_p=rng.choice([1.0, 0.7]),
                top_k=rng.choice([0, 5, 100]),
                min_p=rng.choice([0.0, 0.05]),
                repetition_penalty=rng.choice([1.0, 1.3]),
                frequency_penalty=rng.choice([0.0, 0.5]),
                seed=rng.choice([None, i]),
                max_tokens=rng.randrange(4, 24),
                ignore_eos=True,
                logprobs=rng.choice([None, 2]),
            )
        )
    return prompts, params


def test_seeded_request_alone_equals_in_batch(llm):
    alone = llm.generate([PROMPT], seeded(), use_tqdm=False)[0].outputs[0].token_ids
    others, other_params = random_batch(16, seed=0)
    # In the middle of the batch, so its row and its neighbours both change.
    prompts = others[:8] + [PROMPT] + others[8:]
    params = other_params[:8] + [seeded()] + other_params[8:]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[8].outputs[0].token_ids == alone
    again = llm.generate(list(reversed(prompts)), list(reversed(params)), use_tqdm=False)
    assert again[8].outputs[0].token_ids == alone


def test_different_seeds_differ(llm):
    outs = llm.generate([PROMPT] * 4, [seeded(s) for s in (1, 2, 3, 4)], use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 4


def test_unseeded_requests_differ(llm):
    outs = llm.generate([PROMPT] * 3, seeded(None), use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 3


def test_n_with_seed_is_distinct_and_reproducible(llm):
    first = llm.generate([PROMPT], seeded(n=4), use_tqdm=False)[0]
    second = llm.generate([PROMPT], seeded(n=4), use_tqdm=False)[0]
    samples = [c.token_ids for c in first.outputs]
    assert len({tuple(s) for s in samples}) == 4
    assert [c.token_ids for c in second.outputs] == samples
    # Sample 0 of an n > 1 request is the n = 1 request with the same seed.
    assert llm.generate([PROMPT], seeded(), use_tqdm=False)[0].outputs[0].token_ids == samples[0]


def test_penalties_change_outputs(llm):
    def run(**kw) -> list[int]:
        p = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, **kw)
        return llm.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids

    plain = run()
    # The tiny model falls into loops greedily; every penalty must break them differently.
    assert len(set(plain)) < len(plain)
    for kw in ({"repetition_penalty": 1.8}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = run(**kw)
        assert penalised != plain, kw
        assert len(set(penalised)) > len(set(plain)), kw  # fewer repeats

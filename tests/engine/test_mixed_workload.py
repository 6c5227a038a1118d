"""Chunked prefill, prefix caching and preemption together, under n > 1 and logprobs, change nothing.

One workload (shared prefixes, n > 1, seeded sampling, logprobs and prompt logprobs) runs on a
roomy engine with none of those mechanisms in play, then twice on a cramped one: a 24-token
step budget (every long prompt is chunked), 16 KV blocks (sequences are preempted and
recomputed) and prefix caching (the second run adopts the first run's blocks), and once more with
async scheduling, where preemption and finishes happen while the step before is still running.
"""

from __future__ import annotations

import random

import pytest

from xllm import SamplingParams


def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(99)

    def draw(n: int) -> list[int]:
        return [rng.randrange(5, 512) for _ in range(n)]

    shared = draw(40)
    prompts = [
        draw(90),
        shared + draw(5),
        shared + draw(21),
        draw(1),
        shared[:32],
        draw(17),
        shared + draw(2),
        draw(60),
    ]
    greedy = dict(temperature=0.0, max_tokens=20, ignore_eos=True)
    params = [
        SamplingParams(**greedy, logprobs=2),
        SamplingParams(**greedy, n=3),
        SamplingParams(**greedy, n=2, logprobs=1, prompt_logprobs=2),
        SamplingParams(**greedy),
        SamplingParams(**greedy, prompt_logprobs=0),
        SamplingParams(
            temperature=0.8, top_p=0.9, top_k=50, seed=5, n=2, max_tokens=20, ignore_eos=True, logprobs=0
        ),
        SamplingParams(**greedy, n=2),
        SamplingParams(**greedy, logprobs=3),
    ]
    return prompts, params


def assert_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs], g.request_id
        assert [c.text for c in g.outputs] == [c.text for c in w.outputs]
        assert [c.finish_reason for c in g.outputs] == ["length"] * len(w.outputs)
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert (gc.logprobs is None) == (wc.logprobs is None)
            for ge, we in zip(gc.logprobs or [], wc.logprobs or [], strict=True):
                assert ge.keys() == we.keys()
                assert all(abs(ge[t].logprob - we[t].logprob) < 1e-4 for t in ge)
        assert (g.prompt_logprobs is None) == (w.prompt_logprobs is None)
        if w.prompt_logprobs is not None:
            assert len(g.prompt_logprobs) == len(w.prompt_logprobs) == len(w.prompt_token_ids)
            assert g.prompt_logprobs[0] is None
            for ge, we in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:], strict=True):
                assert ge.keys() == we.keys()
                assert all(abs(ge[t].logprob - we[t].logprob) < 1e-4 for t in ge)


@pytest.mark.parametrize(
    ("use_graphs", "async_scheduling"),
    [(True, False), (False, False), (True, True)],
    ids=["graphs", "eager", "async"],
)
def test_cramped_engine_matches_roomy_engine(make_llm, use_graphs, async_scheduling):
    prompts, params = workload()
    roomy = make_llm(kv_blocks=512, enable_prefix_caching=False, max_num_batched_tokens=4096)
    want = roomy.generate(prompts, params, use_tqdm=False)
    assert roomy.engine.scheduler.num_preemptions == 0
    assert len({tuple(c.token_ids) for c in want[1].outputs}) == 1  # greedy samples agree
    assert len({tuple(c.token_ids) for c in want[5].outputs}) == 2  # seeded samples differ

    cramped = make_llm(
        kv_blocks=16, max_num_batched_tokens=24, use_graphs=use_graphs, async_scheduling=async_scheduling
    )
    assert_same(cramped.generate(prompts, params, use_tqdm=False), want)
    assert cramped.engine.scheduler.num_preemptions > 0, "16 blocks did not force preemption"
    again = cramped.generate(prompts, params, use_tqdm=False)
    assert_same(again, want)
    assert cramped.engine.kv_cache.stats.hit_tokens > 0, "the second run hit no cached prefix"
    # Prompt logprobs need every position computed, so such requests never adopt cached blocks.
    assert again[4].num_cached_tokens == 0 and again[1].num_cached_tokens > 0

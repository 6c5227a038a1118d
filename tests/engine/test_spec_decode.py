"""Speculative decoding by n-gram prompt lookup: the output is exactly plain greedy decoding.

Random-weight models fall into loops quickly, so the lookup finds real guesses here: the tests
check both that guesses were verified and kept (the feature ran) and that every token, finish
reason and text equals the engine without speculation, alone and in batches, with stop
conditions, max_tokens and context limits landing inside a verified run.
"""

from __future__ import annotations

import random

import pytest

from xllm import SamplingParams
from xllm.engine.spec_decode import can_speculate, propose_ngram


def test_propose_ngram_takes_the_latest_longest_match() -> None:
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], k=2, max_n=3) == [7, 1]
    assert propose_ngram([5, 6, 5], k=3, max_n=3) == [6, 5, 6]  # a shorter n-gram; the loop goes on
    assert propose_ngram([1, 2, 3, 4], k=3, max_n=3) == []
    assert propose_ngram([4, 4, 4, 4], k=2, max_n=2) == [4, 4]


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(rng.randint(4, 40))] for _ in range(n)]


@pytest.mark.parametrize(("batch", "use_graphs"), [(1, True), (6, True), (6, False)])
def test_speculative_greedy_equals_plain_greedy(make_llm, batch: int, use_graphs: bool) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    prompts = _prompts(batch)
    plain = make_llm().generate(prompts, params, use_tqdm=False)
    spec_llm = make_llm(num_speculative_tokens=4, use_graphs=use_graphs)
    spec = spec_llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(plain, spec, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].text == a.outputs[0].text
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason
    stats = spec_llm.engine.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens > 0  # it really speculated


def test_verify_steps_replay_the_decode_graphs(make_llm, monkeypatch) -> None:
    """A verifying step runs each of its tokens as a decode row of the graph bucket, so after the
    prefill nothing runs eagerly."""
    llm = make_llm(num_speculative_tokens=4)
    runner = llm.engine.runner
    eager_steps: list[int] = []
    real = runner._forward_eager

    def counting(inputs):
        eager_steps.append(len(inputs.input_ids))
        return real(inputs)

    monkeypatch.setattr(runner, "_forward_eager", counting)
    prompt = _prompts(1, seed=1)
    out = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True), use_tqdm=False
    )
    assert llm.engine.stats().spec_accepted_tokens > 0
    assert eager_steps == [len(prompt[0])]  # the prefill alone
    assert len(out[0].outputs[0].token_ids) == 48


def test_stops_inside_a_verified_run_end_where_plain_decoding_ends(make_llm) -> None:
    base = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = _prompts(4, seed=3)
    reference = make_llm().generate(prompts, base, use_tqdm=False)
    # A stop token the output actually emits, and an odd max_tokens, cut runs of guesses short.
    stop_id = reference[0].outputs[0].token_ids[17]
    params = SamplingParams(temperature=0.0, max_tokens=23, stop_token_ids=[stop_id], ignore_eos=True)
    plain = make_llm().generate(prompts, params, use_tqdm=False)
    spec = make_llm(num_speculative_tokens=5).generate(prompts, params, use_tqdm=False)
    for a, b in zip(plain, spec, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason


def test_sampled_requests_do_not_speculate(make_llm) -> None:
    llm = make_llm(num_speculative_tokens=4)
    seeded = SamplingParams(temperature=0.8, seed=1, max_tokens=24, ignore_eos=True)
    out = llm.generate(_prompts(2), seeded, use_tqdm=False)
    plain = make_llm().generate(_prompts(2), seeded, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in plain]
    assert llm.engine.stats().spec_draft_tokens == 0


def test_can_speculate_only_plain_greedy(make_llm) -> None:
    llm = make_llm()
    engine = llm.engine
    for params, expected in [
        (SamplingParams(temperature=0.0, max_tokens=4), True),
        (SamplingParams(temperature=0.0, max_tokens=4, repetition_penalty=1.2), False),
        (SamplingParams(temperature=0.0, max_tokens=4, logprobs=2), False),
        (SamplingParams(temperature=0.7, max_tokens=4), False),
    ]:
        request = engine.add_request("r", [5, 6, 7], params)
        seq = request.seqs[0]
        seq.num_computed_tokens = seq.num_tokens - 1
        assert can_speculate(seq) is expected, params
        seq.num_computed_tokens = 0
        engine.abort_request("r")


@pytest.mark.slow
def test_speculation_under_tensor_parallelism_keeps_greedy_output(tiny_llama_dir) -> None:
    from xllm import LLM

    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = _prompts(4)
    plain = LLM(str(tiny_llama_dir), dtype="float32").generate(prompts, params, use_tqdm=False)
    llm = LLM(str(tiny_llama_dir), dtype="float32", tensor_parallel_size=2, num_speculative_tokens=4)
    try:
        spec = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
        assert llm.engine.stats().spec_draft_tokens > 0
    finally:
        llm.engine.model.close()  # the TP executor's workers

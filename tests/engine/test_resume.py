"""Resuming a request from output another engine generated (`resume_token_ids` in a prompt dict).

The router's failover and the prefill instance's hand-off both restart a request elsewhere with
the tokens already sent: the continuation must be what the uninterrupted run would have produced,
greedy or seeded, with max_tokens, min_tokens and penalties counting the resumed tokens as output.
"""

from __future__ import annotations

import pytest

from xllm import SamplingParams

PROMPT = [5, 17, 42, 99, 7, 3, 250, 18, 64, 12, 33]


def _run(llm, params: SamplingParams, resume: list[int] | None = None):
    prompt: dict = {"prompt_token_ids": list(PROMPT)}
    if resume:
        prompt["resume_token_ids"] = resume
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3),
    ],
    ids=["greedy", "seeded", "penalties"],
)
@pytest.mark.parametrize("cut", [1, 9, 23])
def test_resumed_run_continues_the_uninterrupted_one(llm, params: SamplingParams, cut: int) -> None:
    whole = _run(llm, params)
    assert len(whole.token_ids) == 24
    resumed = _run(llm, params, resume=list(whole.token_ids[:cut]))
    assert resumed.token_ids == whole.token_ids  # the output includes the resumed tokens
    assert resumed.text == whole.text
    assert resumed.finish_reason == "length"


def test_resumed_tokens_count_toward_min_tokens(llm) -> None:
    # A greedy run's most frequent token acts as EOS once min_tokens allow it.
    base = _run(llm, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    stop_id = max(set(base.token_ids[4:]), key=base.token_ids[4:].count)
    params = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=4, stop_token_ids=[stop_id])
    whole = _run(llm, params)
    cut = min(3, len(whole.token_ids) - 1)
    resumed = _run(llm, params, resume=list(whole.token_ids[:cut]))
    assert resumed.token_ids == whole.token_ids
    assert resumed.finish_reason == whole.finish_reason


@pytest.mark.parametrize(
    ("resume", "params", "message"),
    [
        ([1, 2, 3], SamplingParams(max_tokens=3), "leave nothing to generate"),
        ([1, 2], SamplingParams(max_tokens=8, n=2), "n = 1"),
        ([10**9], SamplingParams(max_tokens=8), "outside the vocabulary"),
        ([2], SamplingParams(max_tokens=8, stop_token_ids=[2]), "already end the request"),
    ],
)
def test_bad_resume_is_refused_alone(llm, resume, params, message) -> None:
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request("bad", {"prompt_token_ids": list(PROMPT), "resume_token_ids": resume}, params)
    assert "bad" not in llm.engine.requests

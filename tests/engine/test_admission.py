"""Bad input is rejected at the boundary, alone, and leaves nothing behind in the engine."""

from __future__ import annotations

import pytest

from xllm import SamplingParams
from xllm.engine.errors import PromptTooLongError

GOOD = [[10, 20, 30, 40], [50, 60, 70]]


def greedy(max_tokens: int = 6, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_to_end(engine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("n", 0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("repetition_penalty", 0),
        ("presence_penalty", 3),
        ("min_p", 2),
    ],
)
def test_bad_sampling_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_names_both():
    with pytest.raises(ValueError, match="min_tokens") as info:
        SamplingParams(min_tokens=5, max_tokens=4)
    assert "max_tokens" in str(info.value)


def test_bad_assignment_is_rejected_too():
    params = SamplingParams()
    with pytest.raises(ValueError, match="temperature"):
        params.temperature = -0.5


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams(temprature=0.5)


def test_prompt_too_long_rejected_alone(make_llm):
    llm = make_llm(max_model_len=64)
    with pytest.raises(PromptTooLongError, match="64"):
        llm.generate([list(range(5, 70))], greedy(), use_tqdm=False)
    # The same engine keeps serving; at the engine level the long prompt is refused while
    # requests already queued run to completion untouched.
    engine = llm.engine
    engine.add_request("a", GOOD[0], greedy())
    with pytest.raises(PromptTooLongError):
        engine.add_request("long", list(range(5, 70)), greedy())
    with pytest.raises(PromptTooLongError):
        engine.add_request("long-text", "The quick brown fox " * 40, greedy())
    engine.add_request("b", GOOD[1], greedy())
    done = run_to_end(engine)
    assert set(done) == {"a", "b"}
    assert all(
        o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 6 for o in done.values()
    )


def test_max_tokens_is_capped_by_the_context(make_llm):
    llm = make_llm(max_model_len=32)
    out = llm.generate([list(range(5, 35))], greedy(max_tokens=100), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].finish_reason == "length"


def test_prompt_larger_than_kv_cache_rejected(make_llm):
    llm = make_llm(kv_blocks=4)  # 64 tokens of KV; the context itself is capped to that
    with pytest.raises(PromptTooLongError):
        llm.generate([list(range(5, 100))], greedy(), use_tqdm=False)
    assert llm.generate([GOOD[0]], greedy(), use_tqdm=False)[0].finished


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        [],
        {"prompt_token_ids": []},
        {"something": "else"},
        [10, 512],  # the tiny model's vocabulary is [0, 512)
        [10, -1],
        [10, 2.5],
        [10, True],
        {"prompt_token_ids": [600]},
        12,
        None,
    ],
    ids=repr,
)
def test_bad_prompt_rejected(llm, prompt):
    with pytest.raises(ValueError):
        llm.engine.add_request("bad", prompt, greedy())
    assert "bad" not in llm.engine.requests


def test_one_bad_prompt_rejects_the_call_without_leaking(llm):
    free_before = llm.engine.kv_cache.num_free_blocks
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([GOOD[0], GOOD[1], [10, 9999], GOOD[0]], greedy(), use_tqdm=False)
    assert llm.engine.kv_cache.num_free_blocks == free_before
    assert not llm.engine.requests
    outs = llm.generate(GOOD, greedy(), use_tqdm=False)  # and the next call works
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]


def test_mismatched_params_list_rejected(llm):
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(GOOD, [greedy()] * 3, use_tqdm=False)


def test_non_sampling_params_rejected(llm):
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.engine.add_request("x", GOOD[0], {"temperature": 0.0})


def test_duplicate_request_id_rejected(llm):
    engine = llm.engine
    engine.add_request("dup", GOOD[0], greedy())
    with pytest.raises(ValueError, match="dup"):
        engine.add_request("dup", GOOD[1], greedy(max_tokens=2))
    done = run_to_end(engine)
    # The first request is untouched: its own prompt and length.
    assert done["dup"].prompt_token_ids == GOOD[0] and len(done["dup"].outputs[0].token_ids) == 6
    # Once finished, the id can be used again.
    engine.add_request("dup", GOOD[1], greedy(max_tokens=2))
    assert len(run_to_end(engine)["dup"].outputs[0].token_ids) == 2


def test_string_and_token_prompts_agree(llm):
    text = "The capital of France is"
    ids = llm.tokenizer(text).input_ids
    by_text, by_ids, by_dict = llm.generate([text, ids, {"prompt_token_ids": ids}], greedy(), use_tqdm=False)
    assert by_text.prompt == text and by_text.prompt_token_ids == ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids == by_dict.outputs[0].token_ids

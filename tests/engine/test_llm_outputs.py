"""What `LLM.generate` hands back: text, stop conditions, finish reasons, n > 1 and logprobs.

All on the tiny random Llama in float32: its text is gibberish, so stop strings and stop tokens
are picked from an unconstrained run's own output, and EOS is found by sampling with a seed.
"""

from __future__ import annotations

import random

import pytest
import torch

from xllm import SamplingParams
from xllm.engine.sequence import SequenceStatus

EOS_IDS = (1, 3)  # make_model's <|end_of_text|> and <|im_end|>


def prompts_of(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 512) for _ in range(length)] for _ in range(n)]


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


# ---------------------------------------------------------------------------- detokenisation


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_equals_decode_of_token_ids(llm, skip_special_tokens):
    # Sampling at temperature 1 from a random model emits byte tokens that split UTF-8 characters,
    # special tokens and EOS (kept: ignore_eos), the hard cases for incremental detokenisation.
    tok = llm.tokenizer
    params = SamplingParams(
        temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, skip_special_tokens=skip_special_tokens
    )
    outs = llm.generate([[t] for t in range(5, 37)], params, use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=skip_special_tokens), c.token_ids
    specials = [t for o in outs for t in o.outputs[0].token_ids if t in tok.all_special_ids]
    assert specials, "no special token was sampled: the case lost its point"


# ---------------------------------------------------------------------------- stop conditions


def _first_completion(text_of, ids: list[int], stop: str) -> int:
    """Index of the token whose text completes the first occurrence of `stop`."""
    for k in range(len(ids)):
        if stop in text_of(ids[: k + 1]):
            return k
    raise AssertionError("stop string not in the text")


def _pick_stop_string(text: str) -> str:
    """A printable two-character fragment of `text` that first occurs after its start."""
    for i in range(3, len(text) - 2):
        s = text[i : i + 2]
        if s.isprintable() and s.strip() == s and text.find(s) == i:
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string(llm, include):
    tok = llm.tokenizer
    prompt = prompts_of(1, 12, seed=1)[0]
    full = llm.generate([prompt], greedy(32), use_tqdm=False)[0].outputs[0]
    stop = _pick_stop_string(full.text)
    idx = full.text.index(stop)
    k = _first_completion(lambda ids: tok.decode(ids, skip_special_tokens=True), full.token_ids, stop)

    c = llm.generate(
        [prompt], greedy(32, stop=[stop, "never-seen"], include_stop_str_in_output=include), use_tqdm=False
    )[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.token_ids == full.token_ids[: k + 1]  # generation ends at the token completing it
    assert c.text == (full.text[: idx + len(stop)] if include else full.text[:idx])


def test_stop_token_ids(llm):
    prompt = prompts_of(1, 12, seed=2)[0]
    full = llm.generate([prompt], greedy(24), use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[5]
    k = full.token_ids.index(stop_id)
    c = llm.generate([prompt], greedy(24, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == full.token_ids[: k + 1]
    # As in vLLM, the stop token's text is left out of the output unless asked for.
    tok = llm.tokenizer
    assert c.text == tok.decode(full.token_ids[:k], skip_special_tokens=True)
    kept = llm.generate(
        [prompt], greedy(24, stop_token_ids=[stop_id], include_stop_str_in_output=True), use_tqdm=False
    )[0].outputs[0]
    assert kept.token_ids == c.token_ids
    assert kept.text == tok.decode(full.token_ids[: k + 1], skip_special_tokens=True)


def test_max_tokens_finishes_with_length(llm):
    outs = llm.generate(prompts_of(3, 5), greedy(7), use_tqdm=False)
    for o in outs:
        assert len(o.outputs[0].token_ids) == 7
        assert o.outputs[0].finish_reason == "length" and o.outputs[0].stop_reason is None
        assert o.finished


def test_min_tokens_suppresses_stop_token_and_stop_string(llm):
    tok = llm.tokenizer
    prompt = prompts_of(1, 12, seed=2)[0]
    full = llm.generate([prompt], greedy(24), use_tqdm=False)[0].outputs[0]
    stop_id = full.token_ids[1]
    c = llm.generate([prompt], greedy(24, stop_token_ids=[stop_id], min_tokens=4), use_tqdm=False)[0].outputs[
        0
    ]
    # Until min_tokens are out the stop id is masked out of the logits (vLLM's semantics), so
    # greedy picks the runner-up where it was the argmax; after that it may stop the request.
    assert len(c.token_ids) >= 4 and stop_id not in c.token_ids[:4]
    first_ban = full.token_ids.index(stop_id)
    assert c.token_ids[:first_ban] == full.token_ids[:first_ban]
    assert c.token_ids[first_ban] != stop_id
    assert stop_id not in c.token_ids[:-1]
    assert c.finish_reason == "length" or (c.token_ids[-1] == stop_id and c.finish_reason == "stop")

    # A stop string completed before min_tokens neither ends the request nor cuts its text.
    stop = full.text[:2] if full.text[:2].strip() else _pick_stop_string(full.text)
    k = _first_completion(lambda ids: tok.decode(ids, skip_special_tokens=True), full.token_ids, stop)
    min_tokens = k + 2
    c = llm.generate([prompt], greedy(min_tokens + 1, stop=[stop], min_tokens=min_tokens), use_tqdm=False)[
        0
    ].outputs[0]
    assert len(c.token_ids) >= min_tokens
    assert c.token_ids == full.token_ids[: len(c.token_ids)]
    if c.finish_reason == "length":
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    else:  # a later occurrence, completed at or after min_tokens, may stop it
        assert c.text.startswith(full.text[: full.text.index(stop) + len(stop)])


def _find_sampled_eos(llm) -> tuple[list[int], SamplingParams, int]:
    """A seeded request whose sampled output holds EOS at position k >= 1."""
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True)
    prompts = [[t] for t in range(5, 133)]  # a few EOS are expected; one is enough
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        ids = out.outputs[0].token_ids
        for k, t in enumerate(ids[:12]):
            if t in EOS_IDS:
                if k >= 1:
                    return prompt, params, k
                break
    raise AssertionError("no EOS sampled; pick another seed")


def test_eos_stops_unless_ignore_eos_or_min_tokens(llm):
    tok = llm.tokenizer
    prompt, params, k = _find_sampled_eos(llm)
    full = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 16  # ignore_eos: runs on

    c = llm.generate([prompt], params.model_copy(update={"ignore_eos": False}), use_tqdm=False)[0].outputs[0]
    assert c.token_ids == full.token_ids[: k + 1]
    assert c.finish_reason == "stop" and c.stop_reason is None
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)  # EOS has no text

    # With min_tokens past that point EOS cannot even be drawn there: it is masked, not skipped.
    c = llm.generate(
        [prompt], params.model_copy(update={"ignore_eos": False, "min_tokens": k + 2}), use_tqdm=False
    )[0].outputs[0]
    assert len(c.token_ids) >= k + 2
    assert not set(EOS_IDS) & set(c.token_ids[: k + 2])


# ---------------------------------------------------------------------------- n > 1


def test_n_completions_are_indexed_and_distinct(llm):
    out = llm.generate(
        [prompts_of(1, 20)[0]],
        SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4


@pytest.mark.parametrize("max_tokens", [1, 2, 8])
def test_n_greedy_completions_are_identical(llm, max_tokens):
    # Siblings are forked from sample 0 after its first token; even when that token already
    # finishes sample 0 (max_tokens=1), the siblings must see the prompt's KV.
    prompt = prompts_of(1, 40, seed=5)[0]  # two full shared blocks plus a partial one
    single = llm.generate([prompt], greedy(max_tokens), use_tqdm=False)[0].outputs[0].token_ids
    out = llm.generate([prompt], greedy(max_tokens, n=3), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [single] * 3


def test_n_siblings_share_prompt_blocks(make_llm):
    llm = make_llm(enable_prefix_caching=False)
    engine = llm.engine
    prompt = prompts_of(1, 40, seed=6)[0]  # blocks: 16 + 16 + 8
    engine.add_request(
        "r", prompt, SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    )
    while not all(
        s.status is SequenceStatus.RUNNING and s.num_computed_tokens >= len(prompt)
        for s in engine.requests["r"].seqs
    ):
        engine.step()
    seqs = engine.requests["r"].seqs
    shared = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == shared for s in seqs)
    assert [engine.kv_cache.blocks[b].ref_count for b in shared] == [4, 4]
    # 2 shared blocks + one own partial block each, versus 4 * 3 for four separate prompts.
    assert engine.kv_cache.num_used_blocks == 2 + 4
    while engine.has_unfinished_requests():
        engine.step()


# ---------------------------------------------------------------------------- logprobs


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return model.eval()


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row p is log_softmax of transformers' logits after ids[: p + 1]."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("k", [0, 5])
def test_sample_logprobs(llm, hf_model, k):
    tok = llm.tokenizer
    prompt = prompts_of(1, 9, seed=8)[0]
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=10, ignore_eos=True, logprobs=k)
    c = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 10
    ref = hf_logprobs(hf_model, prompt + c.token_ids)[len(prompt) - 1 : -1]
    for pos, (entry, t) in enumerate(zip(c.logprobs, c.token_ids, strict=True)):
        row = ref[pos]
        assert t in entry and len(entry) <= k + 1
        # Logprobs are of the model's raw distribution (before temperature), as vLLM reports them.
        assert abs(entry[t].logprob - row[t].item()) < 1e-4
        assert entry[t].rank == int((row > row[t]).sum()) + 1
        assert entry[t].decoded_token == tok.decode([t])
        top = {tid: lp.rank for tid, lp in entry.items() if lp.rank <= k}  # the top-k, ranks 1..k
        assert set(top) == set(row.topk(k).indices.tolist() if k else [])
        assert sorted(top.values()) == list(range(1, k + 1))
        for tid, lp in entry.items():
            assert abs(lp.logprob - row[tid].item()) < 1e-4 and lp.decoded_token == tok.decode([tid])


@pytest.mark.parametrize("n", [1, 2])
def test_prompt_logprobs_match_transformers(llm, hf_model, n):
    tok = llm.tokenizer
    prompt = prompts_of(1, 37, seed=9)[0]
    params = SamplingParams(temperature=0.0, n=n, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    ref = hf_logprobs(hf_model, prompt)
    for j in range(1, len(prompt)):
        entry, t, row = plp[j], prompt[j], ref[j - 1]
        assert t in entry and len(entry) <= 4
        assert abs(entry[t].logprob - row[t].item()) < 1e-4
        assert entry[t].rank == int((row > row[t]).sum()) + 1
        assert {tid for tid, lp in entry.items() if lp.rank <= 3} == set(row.topk(3).indices.tolist())
        for tid, lp in entry.items():
            assert abs(lp.logprob - row[tid].item()) < 1e-4 and lp.decoded_token == tok.decode([tid])


def test_prompt_logprobs_across_chunks_and_preemption(make_llm, hf_model):
    # A 16-token budget prefills the prompt in chunks, and 12 blocks for 3 requests force
    # preemption and recomputation: each prompt position is still reported exactly once.
    llm = make_llm(kv_blocks=12, max_num_batched_tokens=16)
    prompts = prompts_of(3, 45, seed=10)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        ref = hf_logprobs(hf_model, prompt)
        got = [plp[j][prompt[j]].logprob for j in range(1, len(prompt))]
        want = [ref[j - 1, prompt[j]].item() for j in range(1, len(prompt))]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4


# ---------------------------------------------------------------------------- abort


def test_abort_request_finishes_with_abort(make_llm):
    llm = make_llm()
    engine = llm.engine
    engine.add_request("a", prompts_of(1, 30)[0], greedy(50, n=3))
    engine.add_request("b", prompts_of(1, 30, seed=1)[0], greedy(6))
    engine.add_request("held", prompts_of(1, 30, seed=2)[0], greedy(6, n=2))
    out = engine.abort_request("held")  # before its first step: siblings still held
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    for _ in range(4):
        engine.step()
    assert engine.kv_cache.num_used_blocks > 0
    out = engine.abort_request("a")
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert all(0 < len(c.token_ids) < 50 for c in out.outputs)
    assert engine.abort_request("a") is None and engine.abort_request("unknown") is None
    results = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            results[o.request_id] = o
    assert set(results) == {"b"} and results["b"].outputs[0].finish_reason == "length"


def test_failing_step_fails_generate_and_frees_everything(make_llm, monkeypatch):
    llm = make_llm()
    real_execute = llm.engine.runner.execute
    calls = {"n": 0}

    def flaky_execute(scheduled):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected device fault")
        return real_execute(scheduled)

    monkeypatch.setattr(llm.engine.runner, "execute", flaky_execute)
    with pytest.raises(RuntimeError, match="injected device fault"):
        llm.generate(prompts_of(3, 20), greedy(8, n=2), use_tqdm=False)
    assert llm.engine.kv_cache.num_used_blocks == 0 and not llm.engine.requests
    outs = llm.generate(prompts_of(2, 20), greedy(8), use_tqdm=False)  # the engine still serves
    assert all(o.outputs[0].finish_reason == "length" and o.error is None for o in outs)


def test_streamed_text_only_grows_with_stop_strings(llm):
    # A stop string whose first character arrives a token before its last: the text streamed in
    # between must not show that character, since the stop then cuts it (deltas would go negative).
    tok = llm.tokenizer
    prompt = prompts_of(1, 12, seed=1)[0]
    full = llm.generate([prompt], greedy(32), use_tqdm=False)[0].outputs[0]
    bounds = [
        len(tok.decode(full.token_ids[: k + 1], skip_special_tokens=True)) for k in range(len(full.token_ids))
    ]
    stop = next(
        s
        for b in bounds[2:-1]
        if (s := full.text[b - 1 : b + 1]).isprintable() and s.strip() == s and full.text.find(s) == b - 1
    )
    engine = llm.engine
    engine.add_request("streamed", prompt, greedy(32, stop=[stop]))
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step()]
    assert texts[-1] == full.text[: full.text.index(stop)]
    for earlier, later in zip(texts[:-1], texts[1:], strict=True):
        assert later.startswith(earlier), (earlier, later)


# ---------------------------------------------------------------------------- prefix-cache salt


def test_cache_salt_isolates_prefix_cache_between_tenants(llm):
    prompt = prompts_of(1, 40, seed=7)[0]  # two full 16-token blocks can be shared
    params = greedy(4)

    def run(salt: str | None):
        p = params.model_copy(update={"cache_salt": salt})
        return llm.generate([prompt], p, use_tqdm=False)[0]

    first = run("tenant-a")
    assert first.num_cached_tokens == 0
    again = run("tenant-a")
    assert again.num_cached_tokens == 32
    assert run("tenant-b").num_cached_tokens == 0
    assert run(None).num_cached_tokens == 0
    assert run(None).num_cached_tokens == 32  # the unsalted prompt now has its own blocks
    # Isolation changes what is reused, never what is computed.
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_empty_cache_salt_is_rejected():
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")

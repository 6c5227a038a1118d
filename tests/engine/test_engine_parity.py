"""Greedy float32 decoding must match transformers token for token, in every engine configuration.

For each family, a ragged batch of 18 prompts (lengths 1 to 300, several sharing prefixes that
cross block borders) is decoded for 32 tokens with EOS ignored, both by transformers' `generate`
(one prompt at a time, so padding cannot disturb the reference) and by xllm with prefix caching
on and off, chunked prefill under a small token budget, a KV pool small enough to force
preemption, and the graph runner on and off. Logprobs are checked against transformers'
log-softmax of its raw logits.
"""

from __future__ import annotations

import random

import pytest
import torch

from xllm import LLM, SamplingParams

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
MAX_TOKENS = 32
BLOCK_SIZE = 16


def make_prompts(vocab: int, avoid: set[int]) -> list[list[int]]:
    rng = random.Random(1234)
    ids = [t for t in range(vocab) if t not in avoid]

    def draw(n: int) -> list[int]:
        return [rng.choice(ids) for _ in range(n)]

    shared_a = draw(40)  # crosses the 16- and 32-token block borders
    shared_b = draw(70)
    prompts = [draw(n) for n in (1, 2, 7, 15, 16, 17, 33, 64, 100, 180, 255, 300)]
    prompts += [shared_a + draw(n) for n in (1, 9, 30)]
    prompts += [shared_b + draw(n) for n in (2, 50)]
    prompts.append(shared_a[:32])  # a prompt that is exactly two full blocks of another's prefix
    return prompts


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, tiny_model_dir):
    """(model dir, prompts, transformers' greedy tokens and raw logprobs per prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    family = request.param
    path = tiny_model_dir(family)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    # generate() merges the checkpoint's generation_config; drop its EOS so nothing stops early.
    model.generation_config.eos_token_id = None
    prompts = make_prompts(model.config.vocab_size, set(tok.all_special_ids))
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_TOKENS,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens, logprobs = [], []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                generation_config=config,
            )
            new = out.sequences[0, len(p) :].tolist()
            assert len(new) == MAX_TOKENS, "the reference stopped early: EOS was not disabled"
            tokens.append(new)
            lp = [
                torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, new, strict=True)
            ]
            logprobs.append(lp)
    return family, path, prompts, tokens, logprobs


def greedy(logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=logprobs)


def assert_no_leak(llm: LLM) -> None:
    assert llm.engine.kv_cache.num_used_blocks == 0, "KV blocks leaked"
    assert (
        not llm.engine.requests
        and llm.engine.scheduler.num_running == 0
        and llm.engine.scheduler.num_waiting == 0
    )


def tiny_kv_bytes(path, num_blocks: int) -> int:
    from xllm.models import ModelConfig

    c = ModelConfig.from_pretrained(path)
    # One block more than asked: the engine reserves physical block 0 as the null block.
    return 2 * c.num_layers * BLOCK_SIZE * c.num_kv_heads * c.head_dim * 4 * (num_blocks + 1)


CONFIGS = {
    "default": {},
    "no_prefix_caching": {"enable_prefix_caching": False},
    "chunked_prefill": {"max_num_batched_tokens": 64},
    "preemption": {"kv_blocks": 48, "max_num_batched_tokens": 128},
    "no_graphs": {"use_graphs": False},
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_greedy_matches_transformers(reference, config_name):
    family, path, prompts, expected, _ = reference
    opts = dict(CONFIGS[config_name])
    if "kv_blocks" in opts:
        opts["kv_cache_memory"] = tiny_kv_bytes(path, opts.pop("kv_blocks"))
    llm = LLM(model=str(path), dtype="float32", block_size=BLOCK_SIZE, **opts)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    for i, (out, want) in enumerate(zip(outs, expected, strict=True)):
        assert out.outputs[0].token_ids == want, (
            f"{family}/{config_name}: prompt {i} (len {len(prompts[i])}) differs"
        )
        assert out.outputs[0].finish_reason == "length"
    if config_name == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0, "the small pool did not force preemption"
    if config_name == "default":
        # All prompts entered in one step, so nothing was cached yet; a second run is served
        # from the blocks the first one left in the prefix cache, and must not change a token.
        assert llm.engine.kv_cache.stats.hit_tokens == 0
        again = llm.generate(prompts[-6:], greedy(), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected[-6:]
        assert all(
            o.num_cached_tokens > 0 for o, p in zip(again, prompts[-6:], strict=True) if len(p) > BLOCK_SIZE
        )
        assert llm.engine.kv_cache.stats.hit_tokens > 0
    assert_no_leak(llm)


def test_logprobs_match_transformers(reference):
    family, path, prompts, expected, expected_lp = reference
    llm = LLM(model=str(path), dtype="float32", block_size=BLOCK_SIZE)
    outs = llm.generate(prompts, greedy(logprobs=3), use_tqdm=False)
    for out, want_tokens, want_lp in zip(outs, expected, expected_lp, strict=True):
        comp = out.outputs[0]
        assert comp.token_ids == want_tokens
        got = [entry[t].logprob for entry, t in zip(comp.logprobs, comp.token_ids, strict=True)]
        assert max(abs(a - b) for a, b in zip(got, want_lp, strict=True)) < 1e-4
        for entry, t in zip(comp.logprobs, comp.token_ids, strict=True):
            assert entry[t].rank == 1  # greedy picks the most likely token
            assert len(entry) <= 4
    assert_no_leak(llm)


MIN_TOKENS_PROMPTS = 6


@pytest.fixture(scope="module")
def eos_heavy_checkpoint(reference, tmp_path_factory):
    """A copy of the family's checkpoint whose EOS set also holds the token greedy decoding emits
    most often, so EOS is the argmax at many steps and a min-tokens mask is really exercised."""
    import collections
    import json
    import shutil

    family, path, prompts, tokens, _ = reference
    counts = collections.Counter(t for row in tokens[:MIN_TOKENS_PROMPTS] for t in row)
    frequent = counts.most_common(1)[0][0]
    out = tmp_path_factory.mktemp(f"{family}-eos-heavy")
    shutil.copytree(path, out, dirs_exist_ok=True)
    for name in ("generation_config.json", "config.json"):
        cfg = json.loads((out / name).read_text())
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        cfg["eos_token_id"] = sorted({*eos, frequent})
        (out / name).write_text(json.dumps(cfg, indent=2))
    return family, out, prompts[:MIN_TOKENS_PROMPTS], frequent


def test_min_tokens_matches_transformers_min_new_tokens(eos_heavy_checkpoint):
    """Greedy with min_tokens = max_tokens equals transformers' min_new_tokens = max_new_tokens:
    EOS is masked out of the logits (not sampled and then ignored) until min_tokens are out."""
    from transformers import AutoModelForCausalLM

    family, path, prompts, eos_token = eos_heavy_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    expected, stops_early = [], False
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            mask = torch.ones(1, len(p), dtype=torch.long)
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                pad_token_id=0,
            )
            expected.append(out[0, len(p) :].tolist())
            free = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=0
            )
            stops_early |= free.shape[1] - len(p) < MAX_TOKENS
    assert stops_early, "EOS is never the argmax: the test would not exercise the mask"
    assert all(len(e) == MAX_TOKENS and eos_token not in e for e in expected)

    llm = LLM(model=str(path), dtype="float32", block_size=BLOCK_SIZE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, (out, want) in enumerate(zip(outs, expected, strict=True)):
        comp = out.outputs[0]
        assert comp.token_ids == want, f"{family}: prompt {i} differs under min_tokens"
        assert comp.finish_reason == "length"
        # Logprobs stay those of the raw distribution: the mask changes the choice, not the report.
        assert all(entry[t].logprob > float("-inf") for entry, t in zip(comp.logprobs, want, strict=True))
    # Without min_tokens the same engine stops at that EOS, as transformers does.
    free_outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert any(o.outputs[0].finish_reason == "stop" for o in free_outs)
    assert_no_leak(llm)

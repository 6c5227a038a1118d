"""Speculative decoding with a draft model: the output is exactly plain greedy decoding.

Three drafts cover the three ways a step of guesses can end: the target itself (every guess
kept), a slightly perturbed copy of it (some kept, some rejected part-way, so the draft's KV is
rolled back to a common prefix) and an unrelated random model (almost nothing kept). Each must
leave the tokens, text and finish reasons of plain greedy decoding unchanged, and the draft's own
KV blocks must all be free again once its requests end or are aborted.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from xllm import SamplingParams
from xllm.engine.config import EngineConfig
from xllm.engine.draft_model import DraftModelProposer, load_draft_model
from xllm.engine.outputs import RequestMetrics
from xllm.engine.sequence import Request, Sequence
from xllm.hal import get_backend
from xllm.models import ModelConfig


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(rng.randint(4, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def noisy_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with noise (a tenth of each matrix's std) added: a draft that agrees with
    the target often but not always (about a third of its guesses are kept)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("noisy-llama")
    shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weights = {
        name: w + 0.1 * w.float().std() * torch.randn(w.shape, generator=gen) if w.dim() > 1 else w
        for name, w in load_file(str(tiny_llama_dir / "model.safetensors")).items()
    }
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _assert_same_output(plain, spec) -> None:
    for a, b in zip(plain, spec, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].text == a.outputs[0].text
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason


def _stop_params(make_llm, prompts: list[list[int]]) -> SamplingParams:
    """An odd max_tokens and a stop token the output really emits, so that both end a request in
    the middle of a run of guesses."""
    reference = make_llm().generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )
    stop_id = reference[0].outputs[0].token_ids[17]
    return SamplingParams(temperature=0.0, max_tokens=23, stop_token_ids=[stop_id], ignore_eos=True)


def test_the_target_as_its_own_draft_has_every_guess_kept(make_llm, tiny_llama_dir) -> None:
    prompts = _prompts(4, seed=3)
    for params in (
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        _stop_params(make_llm, prompts),
    ):
        plain = make_llm().generate(prompts, params, use_tqdm=False)
        llm = make_llm(num_speculative_tokens=4, speculative_model=str(tiny_llama_dir))
        _assert_same_output(plain, llm.generate(prompts, params, use_tqdm=False))
        stats = llm.engine.stats()
        assert stats.spec_draft_tokens > 0
        assert stats.spec_accepted_tokens == stats.spec_draft_tokens
        assert llm.engine.draft_proposer.kv_cache.num_used_blocks == 0


@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("draft", ["other", "noisy"])
def test_another_draft_model_leaves_greedy_output_unchanged(
    make_llm, tiny_model_dir, noisy_llama_dir, batch: int, draft: str
) -> None:
    draft_dir = tiny_model_dir("llama", seed=1) if draft == "other" else noisy_llama_dir
    prompts = _prompts(batch, seed=3)
    params = _stop_params(make_llm, prompts)
    plain = make_llm().generate(prompts, params, use_tqdm=False)
    llm = make_llm(num_speculative_tokens=5, speculative_model=str(draft_dir))
    _assert_same_output(plain, llm.generate(prompts, params, use_tqdm=False))
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens > 0  # guesses were verified
    if draft == "noisy":  # guesses were kept and rejected, in the same runs
        assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    assert llm.engine.draft_proposer.kv_cache.num_used_blocks == 0


def _sequence(seq_id: int, token_ids: list[int]) -> Sequence:
    params = SamplingParams(temperature=0.0, max_tokens=64)
    request = Request(f"r{seq_id}", None, list(token_ids), params, 0, RequestMetrics(arrival_time=0.0))
    return Sequence(seq_id, request, 0, list(token_ids), len(token_ids), seed=0)


def _proposer(
    path: Path, num_blocks: int = 64, max_model_len: int = 256, budget: int | None = None
) -> DraftModelProposer:
    backend = get_backend("cpu")
    model = load_draft_model(str(path), backend, torch.float32, ModelConfig.from_pretrained(path).vocab_size)
    return DraftModelProposer(
        backend,
        model,
        block_size=16,
        num_blocks=num_blocks,
        max_model_len=max_model_len,
        max_num_seqs=4,
        max_num_batched_tokens=budget,
    )


def test_proposals_are_the_models_own_greedy_continuation(make_llm, tiny_llama_dir) -> None:
    prompts = _prompts(2, seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = make_llm()
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    proposer = _proposer(tiny_llama_dir)
    a, b = _sequence(0, prompts[0]), _sequence(1, prompts[1])
    # First call: the whole prompts are caught up in one batch; different k per sequence.
    assert proposer.propose([a, b], [4, 3]) == [ref[0][:4], ref[1][:3]]
    # The target kept all four guesses of `a` plus its own token. `b` went on for two tokens, the
    # first not the draft's first guess (as with a different target), so the draft's KV of its
    # guesses is stale: it is kept only for the prompt, and both tokens are computed over it.
    a.token_ids += ref[0][:5]
    b.token_ids += [ref[1][0] + 1, ref[1][1]]
    b_ref = llm.generate([b.token_ids], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert proposer.propose([a, b], [4, 2]) == [ref[0][5:9], b_ref[:2]]
    assert proposer.kv_cache.num_used_blocks > 0
    proposer.release(a)
    proposer.release(b)
    proposer.release(b)  # idempotent
    assert proposer.kv_cache.num_used_blocks == 0


def test_a_catch_up_past_the_step_budget_is_split_over_proposals(make_llm, tiny_llama_dir) -> None:
    prompts = _prompts(2, seed=8)
    prompts = [p + p for p in prompts]  # long enough to need several 16-token parts
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in make_llm().generate(prompts, greedy, use_tqdm=False)]
    proposer = _proposer(tiny_llama_dir, budget=16)
    seqs = [_sequence(0, prompts[0]), _sequence(1, prompts[1])]
    rounds = 0
    got = [[], []]
    while not all(got):
        rounds += 1
        for i, draft in enumerate(proposer.propose(seqs, [4, 4])):
            got[i] = got[i] or draft
        assert rounds <= 2 * sum(len(p) for p in prompts) // 16 + 2, "the catch-up made no progress"
    assert rounds > 1  # no proposal computed more than 16 tokens, so it took several
    assert got == [ref[0], ref[1]]
    for seq in seqs:
        proposer.release(seq)


def test_proposer_respects_its_blocks_and_the_context_limit(tiny_llama_dir) -> None:
    proposer = _proposer(tiny_llama_dir, num_blocks=2, max_model_len=64)
    long = _sequence(0, list(range(10, 50)))  # 40 tokens + 3 guesses need 3 blocks of 16
    short = _sequence(1, list(range(10, 20)))
    got = proposer.propose([long, short], [4, 4])
    assert got[0] == [] and len(got[1]) == 4  # the one that does not fit gets nothing
    proposer.release(short)
    assert proposer.kv_cache.num_used_blocks == 0
    # 31 tokens in a 32-token context: guesses may only come from positions 30 and 31.
    near_end = _sequence(2, list(range(10, 41)))
    assert len(_proposer(tiny_llama_dir, max_model_len=32).propose([near_end], [4])[0]) == 2


def test_a_draft_with_another_vocabulary_is_rejected(make_llm, tiny_llama_dir, tmp_path) -> None:
    draft = tmp_path / "draft"
    shutil.copytree(tiny_llama_dir, draft)
    config = json.loads((draft / "config.json").read_text())
    config["vocab_size"] += 64
    (draft / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocab_size"):
        make_llm(num_speculative_tokens=4, speculative_model=str(draft))


def test_config_rejects_a_draft_model_without_speculative_tokens_or_with_tp() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative_model="/some/draft")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(speculative_model="/some/draft", num_speculative_tokens=4, tensor_parallel_size=2)


def test_aborting_a_request_frees_its_draft_blocks(make_llm, tiny_llama_dir) -> None:
    llm = make_llm(num_speculative_tokens=4, speculative_model=str(tiny_llama_dir))
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    engine.add_request("a", _prompts(1, seed=7)[0], params)
    engine.add_request("b", _prompts(1, seed=8)[0], params)
    for _ in range(4):
        engine.step()
    proposer = engine.draft_proposer
    assert engine.stats().spec_draft_tokens > 0
    used = proposer.kv_cache.num_used_blocks
    assert used > 0
    engine.abort_request("a")
    assert 0 < proposer.kv_cache.num_used_blocks < used
    engine.abort_request("b")
    assert proposer.kv_cache.num_used_blocks == 0


def test_the_draft_shares_the_kv_budget_block_for_block(make_llm, tiny_llama_dir, kv_bytes) -> None:
    budget = kv_bytes(tiny_llama_dir, 64)  # 65 target blocks' worth, the null block included
    assert make_llm(kv_cache_memory=budget).engine.kv_cache.num_blocks == 64
    spec = make_llm(kv_cache_memory=budget, num_speculative_tokens=2, speculative_model=str(tiny_llama_dir))
    # The draft here is the target itself: each block of context costs twice, and both caches
    # get the same count (65 // 2 physical blocks, one of them the null block).
    assert spec.engine.kv_cache.num_blocks == spec.engine.draft_proposer.kv_cache.num_blocks == 31

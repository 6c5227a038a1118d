"""Sampling on the CUDA backend (the HAL's reference sampling, run here on CPU tensors): the same
processed logits as the CPU reference, and draws from the HAL's per-row random stream that are
reproducible, independent of the batch, distributed as softmax(processed), and the very tokens
the CPU reference draws for the same seed."""

from __future__ import annotations

import pytest
import torch

from xllm.hal import SamplingMetadata


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_processed_logits_match_cpu_reference(backend, cpu):
    logits = _logits(5, 300)
    md = SamplingMetadata.from_lists(
        temperature=[0.0, 0.7, 1.3, 1.0, 0.9],
        top_k=[5, 50, 0, 20, 0],
        top_p=[1.0, 0.9, 0.8, 1.0, 0.5],
        min_p=[0.0, 0.0, 0.05, 0.1, 0.0],
        repetition_penalty=[1.2, 1.0, 1.1, 1.0, 0.9],
        presence_penalty=[0.0, 0.5, 0.0, -0.3, 0.0],
        frequency_penalty=[0.0, 0.0, 0.4, 0.2, 0.0],
        prompt_token_ids=[[1, 2, 3], [4, 4], [], [7, 8, 9, 10], [0]],
        output_token_ids=[[5], [6, 6, 6], [1], [], [2, 2]],
        vocab_size=300,
    )
    before = logits.clone()
    mine = backend.processed_logits(logits, md)
    ref = cpu.processed_logits(logits, md)
    assert torch.equal(logits, before)
    assert torch.equal(torch.isneginf(mine), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(mine[finite], ref[finite], rtol=1e-6, atol=1e-6)


def test_greedy_is_argmax_and_logprobs_are_raw(backend):
    logits = _logits(4, 50, seed=1).to(torch.bfloat16)
    md = SamplingMetadata.from_lists(temperature=[0.0] * 4, max_num_logprobs=3)
    out = backend.sample(logits, md)
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    raw = logits.float().log_softmax(-1)
    torch.testing.assert_close(out.sampled_logprobs, raw.gather(1, out.sampled_token_ids[:, None]).squeeze(1))
    torch.testing.assert_close(out.top_logprobs, raw.topk(3).values)
    assert out.top_token_ids.shape == (4, 3) and out.top_token_ids.dtype == torch.int64


def test_seeded_draws_are_reproducible_and_batch_independent(backend):
    logits = _logits(4, 200, seed=2)
    kw = dict(
        temperature=[1.0, 0.8, 1.2, 1.0], top_k=[0, 30, 0, 10], seeds=[11, 12, 13, 11], steps=[0, 4, 9, 1]
    )
    tokens = backend.sample(logits, SamplingMetadata.from_lists(**kw)).sampled_token_ids
    assert torch.equal(tokens, backend.sample(logits, SamplingMetadata.from_lists(**kw)).sampled_token_ids)
    for i in range(4):
        alone = SamplingMetadata.from_lists(**{k: v[i : i + 1] for k, v in kw.items()})
        assert int(backend.sample(logits[i : i + 1], alone).sampled_token_ids) == int(tokens[i])
    # Rows 0 and 3 share a seed but not a step: over many steps their streams differ.
    rows = torch.zeros(64, 200)
    seq_a = backend.sample(
        rows, SamplingMetadata.from_lists(temperature=[1.0] * 64, seeds=[11] * 64, steps=list(range(64)))
    )
    seq_b = backend.sample(
        rows, SamplingMetadata.from_lists(temperature=[1.0] * 64, seeds=[12] * 64, steps=list(range(64)))
    )
    assert not torch.equal(seq_a.sampled_token_ids, seq_b.sampled_token_ids)
    assert seq_a.sampled_token_ids.unique().numel() > 40  # uniform logits: draws spread out


def test_draws_follow_the_processed_distribution(backend):
    """Many independent rows (distinct steps) of one distribution: empirical frequencies match
    softmax(processed) and no removed token is ever drawn."""
    vocab, rows = 8, 4000
    base = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2]])
    md = SamplingMetadata.from_lists(
        temperature=[0.9] * rows, top_k=[6] * rows, seeds=[7] * rows, steps=list(range(rows))
    )
    logits = base.expand(rows, vocab).contiguous()
    tokens = backend.sample(logits, md).sampled_token_ids
    probs = backend.processed_logits(logits[:1], SamplingMetadata.from_lists(temperature=[0.9], top_k=[6]))[
        0
    ].softmax(-1)
    freq = torch.bincount(tokens, minlength=vocab).double() / rows
    assert freq[probs == 0].sum() == 0
    # 4000 draws: a binomial standard deviation is <= 0.008; allow 4 of them.
    assert (freq - probs.double()).abs().max() < 0.032


def test_same_seed_gives_the_cpu_backends_tokens(backend, cpu):
    """One random stream on every backend: a seeded row draws the token the CPU reference draws
    (row_seed -> one host uniform per row -> inverse CDF), not merely a token of the same law."""
    logits = _logits(6, 300, seed=3)
    md = SamplingMetadata.from_lists(
        temperature=[0.0, 0.7, 1.0, 1.3, 1.0, 0.9],
        top_k=[0, 50, 0, 20, 0, 0],
        top_p=[1.0, 0.9, 1.0, 0.8, 1.0, 1.0],
        min_p=[0.0, 0.0, 0.05, 0.0, 0.0, 0.0],
        seeds=[1, 2, 3, 4, 5, 2**40 + 7],
        steps=[0, 3, 7, 1, 0, 12],
        repetition_penalty=[1.0, 1.2, 1.0, 1.0, 1.0, 1.0],
        frequency_penalty=[0.0, 0.0, 0.0, 0.3, 0.0, 0.0],
        prompt_token_ids=[[], [1, 2, 3], [], [], [], []],
        output_token_ids=[[], [4, 4], [], [5, 6], [], []],
        vocab_size=300,
    )
    tokens = backend.sample(logits, md).sampled_token_ids
    assert tokens.tolist() == cpu.sample(logits, md).sampled_token_ids.tolist()
    # One request over 64 steps at a flat temperature: the whole sampled sequence is the same.
    steps = 64
    flat = SamplingMetadata.from_lists(
        temperature=[1.5] * steps, seeds=[1234] * steps, steps=list(range(steps))
    )
    rows = logits[2:3].expand(steps, -1).contiguous()
    sequence = backend.sample(rows, flat).sampled_token_ids.tolist()
    assert sequence == cpu.sample(rows, flat).sampled_token_ids.tolist()
    assert len(set(sequence)) > 10  # a real random sequence, not one token over and over


@pytest.mark.parametrize("k", [0, 4])
def test_logprobs_shapes(backend, k):
    out = backend.sample(
        _logits(3, 40), SamplingMetadata.from_lists(temperature=[1.0, 0.0, 0.5], max_num_logprobs=k)
    )
    assert out.top_logprobs.shape == (3, k) and out.sampled_logprobs.shape == (3,)

"""CPU logits processing and sampling semantics: greedy, truncation, penalties, seeding, logprobs."""

from __future__ import annotations

import pytest
import torch

from xllm.hal import SamplingMetadata

V = 64


def logits_for(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_exact_argmax_without_processing(cpu, monkeypatch):
    from xllm.hal import sampling_ops

    # The all-greedy fast path must not copy, sort or process the logits at all.
    monkeypatch.setattr(sampling_ops, "processed_logits", lambda *a: pytest.fail("processed greedy logits"))
    logits = logits_for(5)
    out = cpu.sample(logits, SamplingMetadata.from_lists(temperature=[0.0] * 5))
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_logprobs is None and out.top_logprobs is None
    assert out.sampled_token_ids.dtype == torch.int64


def test_top_k_one_equals_greedy(cpu):
    logits = logits_for(6, seed=1)
    sm = SamplingMetadata.from_lists(temperature=[0.8] * 6, top_k=[1] * 6, seeds=list(range(6)))
    assert torch.equal(cpu.sample(logits, sm).sampled_token_ids, logits.argmax(-1))


def test_seeded_rows_sample_the_same_alone_or_in_any_batch(cpu):
    logits = logits_for(4, seed=2)
    kwargs = dict(
        temperature=[1.0, 0.7, 1.3, 0.0],
        top_p=[0.9, 1.0, 0.95, 1.0],
        seeds=[11, 22, 33, 44],
        steps=[0, 5, 9, 2],
    )
    batch = cpu.sample(logits, SamplingMetadata.from_lists(**kwargs)).sampled_token_ids
    for i in range(4):
        alone = SamplingMetadata.from_lists(**{key: [val[i]] for key, val in kwargs.items()})
        assert int(cpu.sample(logits[i : i + 1], alone).sampled_token_ids[0]) == int(batch[i])
    order = [2, 0, 3, 1]
    shuffled = SamplingMetadata.from_lists(**{key: [val[i] for i in order] for key, val in kwargs.items()})
    assert cpu.sample(logits[order], shuffled).sampled_token_ids.tolist() == batch[order].tolist()


def test_steps_and_seeds_change_the_draw(cpu):
    logits = torch.zeros(1, V)  # uniform: 64 equally likely tokens
    draws = {
        int(
            cpu.sample(
                logits, SamplingMetadata.from_lists(temperature=[1.0], seeds=[7], steps=[s])
            ).sampled_token_ids[0]
        )
        for s in range(20)
    }
    assert len(draws) > 5
    by_seed = {
        int(
            cpu.sample(
                logits, SamplingMetadata.from_lists(temperature=[1.0], seeds=[s], steps=[0])
            ).sampled_token_ids[0]
        )
        for s in range(20)
    }
    assert len(by_seed) > 5


def test_random_sampling_follows_the_distribution(cpu):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = probs.log().expand(n, 4).contiguous()
    sm = SamplingMetadata.from_lists(temperature=[1.0] * n, seeds=list(range(n)))
    counts = torch.bincount(cpu.sample(logits, sm).sampled_token_ids, minlength=4).float() / n
    torch.testing.assert_close(counts, probs, atol=0.03, rtol=0)


def test_logprobs_come_from_raw_logits(cpu):
    logits = logits_for(3, seed=3).to(torch.bfloat16)
    sm = SamplingMetadata.from_lists(
        temperature=[0.0, 0.5, 2.0], top_k=[0, 3, 0], seeds=[1, 2, 3], max_num_logprobs=5
    )
    out = cpu.sample(logits, sm)
    raw = logits.float().log_softmax(-1)
    torch.testing.assert_close(out.sampled_logprobs, raw.gather(1, out.sampled_token_ids[:, None]).squeeze(1))
    values, ids = raw.sort(-1, descending=True)
    torch.testing.assert_close(out.top_logprobs, values[:, :5])
    assert out.top_logprobs.dtype == torch.float32
    assert torch.equal(out.top_token_ids, ids[:, :5])
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    zero = cpu.sample(logits, SamplingMetadata.from_lists(temperature=[0.0] * 3, max_num_logprobs=0))
    assert zero.top_logprobs.shape == (3, 0) and zero.sampled_logprobs.shape == (3,)


def reference_processed(
    row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """One row, step by step with Python lists, in HF's order."""
    x = row.float() / temperature
    values = x.tolist()
    keep = set(range(len(values)))
    if top_k > 0:
        kth = sorted(values, reverse=True)[top_k - 1]
        keep = {i for i in keep if values[i] >= kth}
    if top_p < 1.0:
        kept = sorted(keep, key=lambda i: -values[i])
        weights = torch.tensor([values[i] for i in kept]).softmax(0).tolist()
        total, nucleus = 0.0, set()
        for i, w in zip(kept, weights, strict=False):
            nucleus.add(i)
            total += w
            if total >= top_p:
                break
        keep = nucleus
    if min_p > 0.0:
        masked = torch.full_like(x, float("-inf"))
        masked[list(keep)] = x[list(keep)]
        p = masked.softmax(0)
        keep = {i for i in keep if p[i] >= min_p * p.max()}
    out = torch.full_like(x, float("-inf"))
    out[sorted(keep)] = x[sorted(keep)]
    return out


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 5, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.5, 0, 1.0, 0.2), (0.9, 10, 0.7, 0.05), (1.0, 0, 0.01, 0.0)],
)
def test_truncation_matches_reference(cpu, temperature, top_k, top_p, min_p):
    logits = logits_for(2, seed=4)
    sm = SamplingMetadata.from_lists(
        temperature=[temperature] * 2, top_k=[top_k] * 2, top_p=[top_p] * 2, min_p=[min_p] * 2
    )
    got = cpu.processed_logits(logits, sm)
    assert got.dtype == torch.float32
    for i in range(2):
        torch.testing.assert_close(got[i], reference_processed(logits[i], temperature, top_k, top_p, min_p))
    if top_p == 0.01:
        assert torch.equal(torch.isfinite(got).sum(-1), torch.ones(2, dtype=torch.int64))  # at least one kept


def test_mixed_batch_greedy_rows_get_penalties_only(cpu):
    logits = logits_for(2, seed=5)
    before = logits.clone()
    sm = SamplingMetadata.from_lists(temperature=[0.0, 0.5], top_k=[2, 2], top_p=[0.5, 1.0], min_p=[0.5, 0.0])
    got = cpu.processed_logits(logits, sm)
    assert torch.equal(logits, before)  # input untouched
    assert torch.equal(got[0], logits[0])
    assert int(torch.isfinite(got[1]).sum()) == 2
    torch.testing.assert_close(got[1], reference_processed(logits[1], 0.5, 2, 1.0, 0.0))


def test_repetition_penalty_divides_positive_and_multiplies_negative(cpu):
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]])
    sm = SamplingMetadata.from_lists(
        temperature=[0.0],
        repetition_penalty=[2.0],
        prompt_token_ids=[[0, 1]],
        output_token_ids=[[2, 2]],
        vocab_size=6,
    )
    got = cpu.processed_logits(logits, sm)
    assert got.tolist() == [[1.0, -4.0, 0.5, -1.0, 0.5, 3.0]]
    # The penalty can change the greedy choice.
    logits = torch.tensor([[3.0, 2.0]])
    sm = SamplingMetadata.from_lists(
        temperature=[0.0], repetition_penalty=[2.0], output_token_ids=[[0]], vocab_size=2
    )
    assert int(cpu.sample(logits, sm).sampled_token_ids[0]) == 1


def test_presence_and_frequency_count_output_tokens_only(cpu):
    logits = torch.zeros(2, 5)
    sm = SamplingMetadata.from_lists(
        temperature=[0.0, 1.0],
        presence_penalty=[0.5, 0.0],
        frequency_penalty=[0.25, 1.0],
        prompt_token_ids=[[4, 4], [0]],
        output_token_ids=[[1, 1, 1, 2], [3]],
        vocab_size=5,
    )
    got = cpu.processed_logits(logits, sm)
    # Row 0: token 1 seen 3x -> -(0.25*3 + 0.5); token 2 once -> -(0.25 + 0.5); prompt token 4 untouched.
    assert got[0].tolist() == [0.0, -1.25, -0.75, 0.0, 0.0]
    assert got[1].tolist() == [0.0, 0.0, 0.0, -1.0, 0.0]


def test_bad_sampling_inputs(cpu):
    sm = SamplingMetadata.from_lists(temperature=[1.0, 1.0])
    with pytest.raises(ValueError, match="sampling.temperature"):
        cpu.sample(logits_for(3), sm)
    with pytest.raises(ValueError, match="'logits'"):
        cpu.sample(torch.zeros(2, V, dtype=torch.int64), sm)
    with pytest.raises(ValueError, match="'sampling'"):
        cpu.processed_logits(logits_for(2), {"temperature": [1.0]})


def test_per_row_top_k_in_one_batch(cpu):
    logits = logits_for(4, seed=6)
    sm = SamplingMetadata.from_lists(temperature=[1.0, 0.0, 1.0, 1.0], top_k=[3, 5, 0, V + 10])
    got = cpu.processed_logits(logits, sm)
    assert torch.isfinite(got).sum(-1).tolist() == [3, V, V, V]
    torch.testing.assert_close(got[0], reference_processed(logits[0], 1.0, 3, 1.0, 0.0))


def test_banned_tokens_are_never_sampled_but_keep_raw_logprobs(cpu):
    """min_tokens bans EOS: a banned argmax loses to the runner-up; its reported logprob does not change."""
    logits = logits_for(3, seed=5)
    top2 = logits.topk(2, dim=-1).indices
    sm = SamplingMetadata.from_lists(
        temperature=[0.0, 0.0, 1.0],
        seeds=[1, 2, 3],
        banned_token_ids=[[int(top2[0, 0])], [], [int(top2[2, 0])]],
        max_num_logprobs=1,
    )
    out = cpu.sample(logits, sm)
    assert int(out.sampled_token_ids[0]) == int(top2[0, 1])
    assert int(out.sampled_token_ids[1]) == int(logits[1].argmax())
    assert int(out.sampled_token_ids[2]) != int(top2[2, 0])
    assert int(out.top_token_ids[0, 0]) == int(top2[0, 0])  # the raw distribution still ranks it first
    processed = cpu.processed_logits(logits, sm)
    assert processed[0, top2[0, 0]] == float("-inf") and processed[2, top2[2, 0]] == float("-inf")
    for _ in range(20):  # every seed avoids the banned token, however likely it is
        sm.steps += 1
        assert int(cpu.sample(logits, sm).sampled_token_ids[2]) != int(top2[2, 0])


def test_banned_ids_outside_the_logits_are_rejected(cpu):
    sm = SamplingMetadata.from_lists(temperature=[0.0], banned_token_ids=[[V]])
    with pytest.raises(ValueError, match="sampling.banned"):
        cpu.sample(logits_for(1), sm)

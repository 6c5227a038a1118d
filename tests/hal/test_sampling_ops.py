"""The HAL's shared sampling helpers: the per-row random stream every backend draws from, and the
inverse-CDF draw that turns one uniform per row into a token."""

from __future__ import annotations

import torch

from xllm.hal import SamplingMetadata, sampling_ops
from xllm.hal.sampling_ops import inverse_cdf, random_draws, row_seed, row_uniforms, splitmix64


def test_row_seed_is_splitmix64():
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's published first output for state 0
    assert row_seed(0, 0) == splitmix64(0xE220A8397B1DCDAF)
    assert row_seed(7, 1) != row_seed(7, 2) != row_seed(8, 1)
    assert row_seed(-1, 2) == row_seed(2**64 - 1, 2)  # seeds are taken modulo 2^64


def test_row_uniforms_are_one_host_draw_per_row():
    gen = torch.Generator().manual_seed(row_seed(3, 9))
    want = float(torch.rand((), dtype=torch.float64, generator=gen))
    u = row_uniforms([0, 3, 2**40 + 5], [0, 9, 17])
    assert u.dtype == torch.float64 and u.device.type == "cpu"
    assert float(u[1]) == want
    assert bool(((u >= 0) & (u < 1)).all())
    assert row_uniforms([3], [9]).tolist() == [want]  # a row's draw ignores its neighbours


def test_random_draws_skip_greedy_rows():
    sm = SamplingMetadata.from_lists(temperature=[0.0, 0.7, 0.0, 1.2], seeds=[1, 2, 3, 4], steps=[5, 6, 7, 8])
    draws = random_draws(sm)
    assert draws.rows == [1, 3]
    assert draws.uniforms.tolist() == row_uniforms([2, 4], [6, 8]).tolist()
    assert random_draws(SamplingMetadata.from_lists(temperature=[0.0, 0.0])).rows == []


def test_inverse_cdf_picks_the_token_under_the_target():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]] * 5)
    u = torch.tensor([0.0, 0.1999, 0.2, 0.69, 0.9999], dtype=torch.float64)
    # cdf = 0.2, 0.2, 0.7, 1.0: the zero-probability token 1 is never the first entry above u.
    assert inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 3]
    unnormalised = probs * 4  # the target scales with the total
    assert inverse_cdf(unnormalised, u).tolist() == [0, 0, 2, 2, 3]


def test_sample_draws_with_the_given_uniforms():
    logits = torch.log(torch.tensor([[0.2, 0.0, 0.5, 0.3], [0.1, 0.6, 0.2, 0.1]]))
    sm = SamplingMetadata.from_lists(temperature=[1.0, 0.0])
    draws = sampling_ops.RandomDraws([0], torch.tensor([0.75], dtype=torch.float64))
    assert sampling_ops.sample(logits, sm, draws).sampled_token_ids.tolist() == [3, 1]

"""The host-side row planning of the JAX attention, on paths the conformance shapes do not reach:
long prefills cut into query pieces and calls split to bound the score matrix."""

from __future__ import annotations

import pytest
import torch
from xllm.hal.conformance.inputs import generator, paged_batch

from xllm_jax import attention


def test_plan_keeps_decodes_together_and_splits_prefills():
    # seq 0, 2: decodes; seq 1: a 40-token chunk over a 10-token prefix.
    calls = attention.plan_rows([0, 1, 41, 42], [20, 50, 7], num_heads=4)
    assert calls[0].seq == [0, 2] and calls[0].q_len == [1, 1] and calls[0].ctx_len == [20, 7]
    assert [(c.seq, c.start, c.q_len, c.ctx_len) for c in calls[1:]] == [([1], [1], [40], [50])]


@pytest.mark.parametrize("window", [None, 6])
def test_pieces_of_a_long_prefill_match_cpu(monkeypatch, window, jax_backend, cpu_backend):
    # Small enough that every prefill is cut into several query pieces, in separate calls.
    monkeypatch.setattr(attention, "MAX_SCORE_ELEMENTS", 4 * 8 * 64)
    calls = attention.plan_rows([0, 1, 38, 51], [30, 37, 20], num_heads=4)
    assert len(calls) > 3 and all(sum(c.q_len) for c in calls)
    batch = paged_batch(generator(3), [(29, 1), (0, 37), (7, 13)], 4, 2, 32, 16, torch.float32, window)
    args = (batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.metadata)
    got = jax_backend.attention(*args)
    want = cpu_backend.attention(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

"""GraphRunner bookkeeping shared by every backend (checked on the CPU backend)."""

from __future__ import annotations

import torch

from xllm.hal import GraphInput, get_backend


def test_capturing_a_new_bucket_never_replays_stale_inputs():
    """A bucket captured lazily must not run `fn` over the previous batch's buffer contents:
    with a KV cache that would write old tokens into slots other sequences now own."""
    backend = get_backend("cpu")
    cache = torch.zeros(16)

    def step(slot: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        valid = slot >= 0
        cache[slot[valid]] = value[valid]  # like reshape_and_cache: writes through the slot mapping
        return value * 2

    runner = backend.create_graph_runner(
        step,
        {"slot": GraphInput(torch.int64, pad_value=-1), "value": GraphInput(torch.float32)},
        capture_sizes=[2, 4],
    )
    out = runner.run(slot=torch.tensor([0, 1, 2]), value=torch.tensor([1.0, 2.0, 3.0]))
    assert out.tolist() == [2.0, 4.0, 6.0]
    cache.zero_()
    # Slots 0..2 now belong to someone else; the new bucket (2) is captured on this call.
    out = runner.run(slot=torch.tensor([9]), value=torch.tensor([5.0]))
    assert out.tolist() == [10.0]
    assert cache.nonzero().flatten().tolist() == [9]

"""Block 0 is the null block: the KV-cache manager never gives it to a sequence.

Graph replay pads a decode batch with rows over block 0, and a backend whose cache-write
operator cannot skip slot -1 (the Ascend graph path) writes their K/V into slot 0 of block 0. If
block 0 held a real token, padding would overwrite it. These tests pin the contract: the manager
reserves block 0, and a backend that writes padding into block 0 decodes exactly like one that
skips it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from xllm import LLM, SamplingParams
from xllm.backends.cpu.backend import CpuBackend
from xllm.engine.kv_cache_manager import NULL_BLOCK_ID, KVCacheManager
from xllm.engine.outputs import RequestMetrics
from xllm.engine.sequence import Request, Sequence
from xllm.hal import register_backend, unregister_backend


def make_seq(tokens: list[int], seq_id: int) -> Sequence:
    req = Request(str(seq_id), None, list(tokens), SamplingParams(), 0, RequestMetrics(0.0))
    seq = Sequence(seq_id, req, 0, list(tokens), len(tokens), seed=0)
    req.seqs.append(seq)
    return seq


def test_the_manager_never_hands_out_the_null_block():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.num_blocks == 4 and kv.num_physical_blocks == 5
    seqs = [make_seq(list(range(4)), i) for i in range(4)]
    for s in seqs:
        assert kv.allocate(s, 4)
    assert kv.num_free_blocks == 0 and not kv.allocate(make_seq([1], 9), 1)
    assert sorted(b for s in seqs for b in s.block_table) == [1, 2, 3, 4]
    for s in seqs:
        kv.free(s)
    assert NULL_BLOCK_ID not in kv.free_blocks and kv.num_free_blocks == 4


class PaddingIntoNullBlock(CpuBackend):
    """Writes padding rows (slot -1) to slot 0, as the Ascend graph path's cache write does."""

    def _reshape_and_cache(self, k, v, k_cache, v_cache, slot_mapping):
        super()._reshape_and_cache(k, v, k_cache, v_cache, torch.where(slot_mapping < 0, 0, slot_mapping))


@pytest.fixture
def padding_backend() -> Iterator[str]:
    register_backend("cpu-pads-null-block", PaddingIntoNullBlock)
    yield "cpu-pads-null-block"
    unregister_backend("cpu-pads-null-block")


def test_padding_written_to_block_0_never_reaches_a_real_token(tiny_llama_dir, padding_backend):
    # Three prompts decode as a batch of 3 inside the bucket of 4: one padding row per replay.
    prompts = [[5 + i, 17, 300 + i, 42, 9] * (3 + i) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kwargs = dict(model=str(tiny_llama_dir), dtype="float32", block_size=16, capture_sizes=[1, 2, 4])
    reference = LLM(backend="cpu", use_graphs=False, **kwargs).generate(prompts, params, use_tqdm=False)
    padded = LLM(backend=padding_backend, use_graphs=True, **kwargs)
    outs = padded.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
    assert padded.engine.kv_caches[0][0].shape[0] == padded.engine.kv_cache.num_blocks + 1

"""KVCacheManager: allocation, reference counts, prefix caching and LRU eviction."""

from __future__ import annotations

from xllm.engine.kv_cache_manager import KVCacheManager
from xllm.engine.outputs import RequestMetrics
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.sequence import Request, Sequence


def make_seq(tokens: list[int], seq_id: int = 0, params: SamplingParams | None = None) -> Sequence:
    req = Request(str(seq_id), None, list(tokens), params or SamplingParams(), 0, RequestMetrics(0.0))
    seq = Sequence(seq_id, req, 0, list(tokens), len(tokens), seed=0)
    req.seqs.append(seq)
    return seq


def test_allocate_is_all_or_nothing_and_free_returns_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(10)))
    assert kv.allocate(a, 10)
    assert len(a.block_table) == 3 and kv.num_free_blocks == 1
    b = make_seq(list(range(8)), 1)
    assert not kv.allocate(b, 8)  # needs 2, only 1 free
    assert b.block_table == [] and kv.num_free_blocks == 1
    kv.free(a)
    assert kv.num_free_blocks == 4 and kv.num_used_blocks == 0


def test_prefix_hit_reuses_computed_blocks_and_counts_hit_rate():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks
    a = make_seq(prompt)
    assert kv.match_prefix(a) == 0
    assert kv.allocate(a, len(prompt))
    a.num_computed_tokens = len(prompt)
    kv.commit_computed_blocks(a)
    b = make_seq(prompt[:8] + [7, 7, 7], 1)
    assert kv.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert kv.blocks[a.block_table[0]].ref_count == 2
    assert kv.stats.hit_tokens == 8 and kv.stats.queried_tokens == 22
    kv.free(a)
    kv.free(b)
    assert kv.num_used_blocks == 0


def test_match_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(8))  # exactly two full blocks
    a = make_seq(prompt)
    kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.commit_computed_blocks(a)
    kv.free(a)
    b = make_seq(prompt, 1)
    assert kv.match_prefix(b) == 4  # the last block is recomputed to produce logits


def test_freed_cached_blocks_survive_until_evicted_lru():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_seq([1, 2, 3])
    kv.allocate(a, 3)
    a.num_computed_tokens = 3
    kv.commit_computed_blocks(a)
    cached_block = a.block_table[0]
    kv.free(a)
    assert kv.num_free_blocks == 3
    # Two allocations take the uncached blocks first; the cached one is still matchable.
    b = make_seq([9, 9, 9, 9], 1)
    kv.allocate(b, 2)
    c = make_seq([1, 2, 5], 2)
    assert kv.match_prefix(c) == 2 and c.block_table == [cached_block]
    kv.free(b)
    kv.free(c)
    # Filling the whole pool evicts it.
    d = make_seq(list(range(50, 56)), 3)
    assert kv.allocate(d, 6)
    e = make_seq([1, 2, 5], 4)
    assert kv.match_prefix(e) == 0
    kv.free(d)
    assert kv.num_used_blocks == 0


def test_prompt_logprobs_disable_prefix_hits():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    kv.allocate(a, 5)
    a.num_computed_tokens = 5
    kv.commit_computed_blocks(a)
    b = make_seq([1, 2, 3, 4, 5], 1, SamplingParams(prompt_logprobs=1))
    assert kv.match_prefix(b) == 0
    kv.free(a)


def test_share_prefix_references_parent_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    parent = make_seq(list(range(10)))
    kv.allocate(parent, 10)
    child = make_seq(list(range(10)), 1)
    kv.share_prefix(parent, child, 8)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    kv.free(parent)
    assert kv.num_used_blocks == 2
    kv.free(child)
    assert kv.num_used_blocks == 0

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
    kv.record_prefix_hit(a)
    a.num_computed_tokens = len(prompt)
    kv.commit_computed_blocks(a)
    b = make_seq(prompt[:8] + [7, 7, 7], 1)
    assert kv.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert kv.blocks[a.block_table[0]].ref_count == 2
    kv.record_prefix_hit(b)
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


def computed(kv: KVCacheManager, seq: Sequence) -> Sequence:
    """Admits `seq`, marks its prompt computed and registers its full blocks."""
    kv.match_prefix(seq)
    assert kv.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    kv.commit_computed_blocks(seq)
    return seq


def test_block_hashes_are_sha256_digests_stable_across_processes():
    """Python's hash() of int tuples is 64-bit and its collisions can be built on purpose; a
    SHA-256 chain cannot be steered, and is the same in every process (for cluster routing)."""
    import hashlib
    import subprocess
    import sys

    from xllm.engine.kv_cache_manager import chain_hash, root_hash

    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = computed(kv, make_seq(list(range(9))))
    assert all(isinstance(h, bytes) and len(h) == 32 for h in a.block_hashes)
    first = hashlib.sha256(root_hash(None) + b"".join(t.to_bytes(8, "little") for t in range(4))).digest()
    assert a.block_hashes[0] == first
    assert a.block_hashes[1] == chain_hash(first, [4, 5, 6, 7])
    # The same digest in a fresh interpreter (PYTHONHASHSEED differs there).
    code = "from xllm.engine.kv_cache_manager import chain_hash, root_hash; print(chain_hash(root_hash(None), [0, 1, 2, 3]).hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == first.hex()
    # Tokens that Python's tuple hash confuses stay apart: -1 and -2 hash alike in CPython.
    assert hash(-1) == hash(-2)
    assert chain_hash(first, [-1]) != chain_hash(first, [-2])


def test_cache_salt_isolates_tenants():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(50, 63))
    computed(kv, make_seq(prompt, 0, SamplingParams(cache_salt="tenant-a")))
    same_salt = make_seq(prompt, 1, SamplingParams(cache_salt="tenant-a"))
    assert kv.match_prefix(same_salt) == 12
    other_salt = make_seq(prompt, 2, SamplingParams(cache_salt="tenant-b"))
    assert kv.match_prefix(other_salt) == 0
    unsalted = make_seq(prompt, 3)
    assert kv.match_prefix(unsalted) == 0
    # An unsalted request's blocks are not offered to a salted one either.
    computed(kv, unsalted)
    assert kv.match_prefix(make_seq(prompt, 4, SamplingParams(cache_salt="tenant-b"))) == 0


def test_prefix_hits_count_once_however_often_admission_is_retried():
    from xllm.engine.scheduler import Scheduler

    kv = KVCacheManager(num_blocks=10, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(20))
    warm = computed(kv, make_seq(prompt))  # 5 cached blocks; the first 4 can be matched
    kv.free(warm)
    hog = make_seq(list(range(100, 124)), 1)
    # 6 blocks: the 5 empty ones and the cached last block, so the 4 matchable blocks stay
    # cached but the prompt below finds no free block for its last token.
    assert kv.allocate(hog, 24)
    seq = make_seq(prompt, 2)
    sched.add(seq)
    for _ in range(3):  # three retries, each matching 16 cached tokens, then failing to allocate
        assert sched.schedule().is_empty
    assert kv.stats.queried_tokens == 0 and kv.stats.hit_tokens == 0
    kv.free(hog)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [seq]
    assert kv.stats.queried_tokens == 20 and kv.stats.hit_tokens == 16
    assert seq.num_cached_tokens == 16

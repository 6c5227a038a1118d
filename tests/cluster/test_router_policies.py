"""Placement policies on hand-built members, and prefix digests equal to the engine's own."""

from __future__ import annotations

import time

from xllm.cluster.policies import (
    STALE_LOAD_S,
    CacheAwareLimits,
    cache_aware,
    least_loaded,
    member_status,
    prompt_block_digests,
    round_robin,
)
from xllm.cluster.registry import InstanceInfo, InstanceLoad, Member, Role, Status
from xllm.engine.kv_cache_manager import KVCacheManager
from xllm.engine.outputs import RequestMetrics
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.sequence import Request, Sequence

BLOCK = 4


def member(
    name: str,
    running: int = 0,
    waiting: int = 0,
    kv: float = 0.0,
    cached: list[str] | None = None,
    capacity: int = 16,
    age_s: float = 0.0,
    draining: bool = False,
) -> Member:
    info = InstanceInfo(name, Role.MIXED, f"http://{name}", "m", "cpu", capacity, BLOCK)
    load = InstanceLoad(running, waiting, kv, draining, cached or [], time.time() - age_s)
    return Member(info, load)


def test_prompt_block_digests_equal_what_the_kv_cache_manager_registers():
    tokens = list(range(100, 111))  # 2 full blocks of 4 and a partial one
    for salt in (None, "tenant-a"):
        params = SamplingParams(cache_salt=salt)
        req = Request("r", None, tokens, params, 0, RequestMetrics(0.0))
        seq = Sequence(0, req, 0, list(tokens), len(tokens), seed=0)
        kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
        assert kv.allocate(seq, len(tokens))
        seq.num_computed_tokens = len(tokens)
        kv.commit_computed_blocks(seq)
        engine = [h.hex() for h in seq.block_hashes]
        assert len(engine) == 2
        assert prompt_block_digests(tokens, BLOCK, salt) == engine
        assert set(engine) <= {h.hex() for h in kv.cached_blocks}
    # A salt starts another chain: no block is shared.
    assert not set(prompt_block_digests(tokens, BLOCK, "x")) & set(prompt_block_digests(tokens, BLOCK, None))
    assert prompt_block_digests(tokens[:3], BLOCK, None) == []


def test_member_status_up_draining_dead():
    assert member_status(member("a")) is Status.UP
    assert member_status(member("a", draining=True)) is Status.DRAINING
    assert member_status(member("a"), drained={"a"}) is Status.DRAINING
    assert member_status(member("a", age_s=STALE_LOAD_S + 1)) is Status.DEAD
    assert member_status(Member(member("a").info, None)) is Status.UP  # just registered


def test_round_robin_rotates_in_id_order():
    ms = [member("b"), member("a"), member("c")]
    assert [round_robin(ms, t).info.id for t in range(4)] == ["a", "b", "c", "a"]
    assert round_robin([], 0) is None


def test_least_loaded_uses_queue_over_capacity_then_kv_usage():
    busy = member("a", running=4, waiting=2)
    idle = member("b", running=1)
    assert least_loaded([busy, idle]).info.id == "b"
    # Relative to capacity: 4 of 64 is less loaded than 2 of 4.
    assert (
        least_loaded([member("a", running=2, capacity=4), member("b", running=4, capacity=64)]).info.id == "b"
    )
    # Equal queues: lower KV usage wins.
    assert least_loaded([member("a", running=1, kv=0.8), member("b", running=1, kv=0.2)]).info.id == "b"
    assert least_loaded([]) is None


def test_cache_aware_picks_the_longest_cached_prefix():
    tokens = list(range(16))  # 4 blocks
    d = prompt_block_digests(tokens, BLOCK, None)
    one = member("a", cached=d[:1])
    three = member("b", running=2, cached=d[:3])
    gap = member("c", cached=[d[0], d[2], d[3]])  # only the first block leads
    assert cache_aware([one, three, gap], tokens).info.id == "b"
    # The salt changes the names: no hit, so load decides.
    assert cache_aware([one, three, gap], tokens, cache_salt="s").info.id == "a"
    # No hit anywhere, or no prompt ids: least loaded.
    assert cache_aware([member("a", running=3), member("b")], tokens).info.id == "b"
    assert cache_aware([three, member("z")], None).info.id == "z"
    assert cache_aware([], tokens) is None


def test_cache_aware_yields_to_load_when_the_winner_is_overloaded():
    tokens = list(range(16))
    d = prompt_block_digests(tokens, BLOCK, None)
    idle = member("idle")
    # Full: running + waiting reached capacity.
    assert cache_aware([member("hit", running=10, waiting=6, cached=d), idle], tokens).info.id == "idle"
    # KV cache nearly full.
    assert cache_aware([member("hit", kv=0.95, cached=d), idle], tokens).info.id == "idle"
    # Imbalance beyond both bounds (abs > 8 and rel > 1.5) against the idlest member.
    assert cache_aware([member("hit", running=10, cached=d), idle], tokens).info.id == "idle"
    # Within the bounds the cache still wins.
    assert cache_aware([member("hit", running=5, cached=d), idle], tokens).info.id == "hit"
    strict = CacheAwareLimits(balance_abs=2, balance_rel=1.0)
    assert cache_aware([member("hit", running=5, cached=d), idle], tokens, limits=strict).info.id == "idle"

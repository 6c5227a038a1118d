"""Placement policies: which instance of the cluster serves a request.

Pure functions over the router's view of the cluster (`list[Member]`), so that they can be tested
on hand-built members and reused by any router. `member_status` says whether a member may take
new work (up), is being drained, or is dead (its load stopped refreshing); the policies only ever
see members that are up. `cache_aware` follows SGLang's cache-aware router: the member holding the
longest cached prefix of the prompt wins unless it is overloaded or far busier than the idlest
member, in which case load balancing (`least_loaded`) wins. Prefix blocks are named by the same
SHA-256 chain the engine's `KVCacheManager` uses, so a router and every instance agree on them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

from xllm.cluster.registry import Member, Status
from xllm.engine.kv_cache_manager import chain_hash, root_hash

# A load record older than this (instances refresh every LOAD_INTERVAL_S = 1 s) means the
# instance stopped publishing: it is treated as dead until its lease expires and it disappears.
STALE_LOAD_S = 3.0


class PolicyName(str, enum.Enum):
    CACHE_AWARE = "cache_aware"
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True, slots=True)
class CacheAwareLimits:
    """When the cache-aware choice yields to load balancing (SGLang's balance thresholds)."""

    # Above this KV-cache usage an instance would evict (or preempt) to take more work.
    max_kv_cache_usage: float = 0.9
    # The cache winner is "too busy" when its queue (running + waiting) exceeds the idlest
    # member's by more than `balance_abs` requests AND by a factor of more than `balance_rel`.
    balance_abs: int = 8
    balance_rel: float = 1.5


def prompt_block_digests(token_ids: Sequence[int], block_size: int, cache_salt: str | None) -> list[str]:
    """Hex digests of the prompt's full blocks, chained exactly as `KVCacheManager` names them
    (a trailing partial block has no name: the engine caches only full blocks)."""
    digests: list[str] = []
    parent = root_hash(cache_salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, list(token_ids[start : start + block_size]))
        digests.append(parent.hex())
    return digests


def member_status(
    member: Member, drained: set[str] | frozenset[str] = frozenset(), now: float | None = None
) -> Status:
    """up, draining (asked to by the router or by itself) or dead (its load is stale).

    A member with no load yet has just registered; its live lease says it is up.
    """
    load = member.load
    if member.info.id in drained or (load is not None and load.draining):
        return Status.DRAINING
    if load is not None and (time.time() if now is None else now) - load.updated_at > STALE_LOAD_S:
        return Status.DEAD
    return Status.UP


def queue_length(member: Member) -> int:
    load = member.load
    return 0 if load is None else load.num_requests_running + load.num_requests_waiting


def load_key(member: Member) -> tuple[float, float, str]:
    """Queue relative to capacity, then KV usage, then id (so ties break the same way everywhere)."""
    kv = 0.0 if member.load is None else member.load.kv_cache_usage
    return (queue_length(member) / max(member.info.capacity, 1), kv, member.info.id)


def round_robin(members: Sequence[Member], turn: int) -> Member | None:
    """The `turn`-th member (modulo), in id order so the rotation is stable across polls."""
    if not members:
        return None
    ordered = sorted(members, key=lambda m: m.info.id)
    return ordered[turn % len(ordered)]


def least_loaded(members: Sequence[Member]) -> Member | None:
    return min(members, key=load_key, default=None)


def cached_prefix_blocks(member: Member, digests: Sequence[str], routed: Container[str] = ()) -> int:
    """How many leading blocks of the prompt `member` holds in its prefix cache, as it published
    it or (`routed`) as the router knows from the prompts it sent there since."""
    published = member.load.cached_blocks if member.load is not None else []
    if not published and not routed:
        return 0
    cached = set(published)
    n = 0
    for d in digests:
        if d not in cached and d not in routed:
            break
        n += 1
    return n


def overloaded(member: Member, least: Member, limits: CacheAwareLimits) -> bool:
    load = member.load
    if load is None:
        return False
    queue, least_queue = queue_length(member), queue_length(least)
    return (
        queue >= member.info.capacity
        or load.kv_cache_usage > limits.max_kv_cache_usage
        or (queue - least_queue > limits.balance_abs and queue > least_queue * limits.balance_rel)
    )


def cache_aware(
    members: Sequence[Member],
    token_ids: Sequence[int] | None,
    cache_salt: str | None = None,
    limits: CacheAwareLimits = CacheAwareLimits(),
    routed: Mapping[str, Container[str]] | None = None,
) -> Member | None:
    """The member with the longest cached prefix of `token_ids`, unless it is overloaded (see
    `CacheAwareLimits`); no hit at all, or no prompt ids, falls back to `least_loaded`.

    `routed` (instance id -> block digests) is what the router itself sent each member since:
    published caches lag by up to a second, and a burst of requests sharing a prefix would
    otherwise scatter before the first one's blocks are published (SGLang's router keeps such
    an approximate tree of its own routing for the same reason)."""
    least = least_loaded(members)
    if least is None or not token_ids:
        return least
    digests_by_block_size: dict[int, list[str]] = {}  # members may differ in block size
    best: Member | None = None
    best_tokens = 0
    for m in sorted(members, key=load_key):  # ties go to the less loaded member
        bs = m.info.block_size
        if bs not in digests_by_block_size:
            digests_by_block_size[bs] = prompt_block_digests(token_ids, bs, cache_salt)
        # Compare hit lengths in tokens: members with different block sizes stay comparable.
        mine = routed.get(m.info.id, ()) if routed is not None else ()
        tokens = cached_prefix_blocks(m, digests_by_block_size[bs], mine) * bs
        if tokens > best_tokens:
            best, best_tokens = m, tokens
    if best is None or overloaded(best, least, limits):
        return least
    return best

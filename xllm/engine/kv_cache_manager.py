"""`KVCacheManager`: fixed-size KV blocks with reference counts and prefix caching.

A block holds `block_size` tokens' K/V for every layer. Sequences own blocks through their block
tables; a block shared by several sequences (a common prefix, or the n samples of one request)
has one reference per owner. With prefix caching, every *full* block is named by a hash of its
tokens chained with its parent block's hash, so equal prefixes map to equal hashes and a new
sequence can adopt already-computed blocks. Freed blocks keep their contents and their hash in an
LRU free list until they are reused, so later requests can still hit them.

Physical block 0 is the null block (as in vLLM): it is never given to a sequence, so padding rows
of a replayed graph, which point at block 0, may have their K/V written there by a backend that
cannot skip a write (the HAL's padding contract; see `AttentionMetadata`). The manager hands out
ids 1..num_blocks, so the KV cache holds ``num_blocks + 1`` physical blocks.

Block hashes are SHA-256 digests (see `chain_hash`): a client that could make two different
prefixes collide would make another client's request attend over the wrong KV (vLLM's
CVE-2025-25183, where Python's `hash()` was used). The chain starts from a root digest of the
request's `cache_salt`, so requests with different salts never share a block, and it is unkeyed
so that every instance of a cluster names the same prefix the same way (cache-aware routing).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from xllm.engine.sequence import Sequence

BlockHash = bytes  # a 32-byte SHA-256 digest


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set once the block is full and registered in the prefix cache


@dataclass(slots=True)
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@lru_cache(maxsize=1024)
def root_hash(cache_salt: str | None) -> BlockHash:
    """The parent digest of a sequence's first block: the salt enters the chain here and so
    reaches every block after it. Length-prefixed, so no salt is a prefix-trick of another."""
    salt = b"" if cache_salt is None else cache_salt.encode("utf-8")
    flag = b"\x00" if cache_salt is None else b"\x01"
    return hashlib.sha256(b"xllm-kv-root" + flag + len(salt).to_bytes(8, "little") + salt).digest()


def chain_hash(parent_hash: BlockHash, block_tokens: list[int] | tuple[int, ...]) -> BlockHash:
    """SHA-256 of the parent digest (fixed 32 bytes) followed by the block's token ids as
    little-endian int64: a stable serialisation, the same in every process and on every host."""
    tokens = array("q", block_tokens)
    if sys.byteorder == "big":  # pragma: no cover - keeps digests equal across hosts
        tokens.byteswap()
    return hashlib.sha256(parent_hash + tokens.tobytes()).digest()


NULL_BLOCK_ID = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        """`num_blocks` usable blocks, ids 1..num_blocks; id 0 is the reserved null block."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks + 1)]  # blocks[0] is the null block
        # Blocks with ref_count 0, least recently freed first: the front is evicted first.
        # Invariant: a block other than the null block is in free_blocks iff its ref_count is 0.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks + 1))
        # hash -> block id for full blocks whose contents are known (in use or free-but-cached).
        self.cached_blocks: dict[BlockHash, int] = {}
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ queries

    @property
    def num_blocks(self) -> int:
        """Blocks sequences can own (the null block is not one of them)."""
        return len(self.blocks) - 1

    @property
    def num_physical_blocks(self) -> int:
        """Blocks the KV cache must hold: the usable ones plus the null block."""
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_block_digests(self, limit: int) -> list[BlockHash]:
        """Up to `limit` digests of the prefix cache's blocks, most recently used first: blocks in
        use, then free ones from the most recently freed (the last to be evicted) on.

        Called from threads other than the engine's (the cluster's load report): it reads only
        snapshots, `list(dict)` and `dict.items()` copies made by one C call each, which CPython's
        GIL runs without interleaving the engine thread (keys are bytes and ints, whose hashing
        and comparison run no Python code). The two snapshots may be a step apart; the result is
        a hint for routing, not an invariant.
        """
        if limit <= 0:
            return []
        cached = list(self.cached_blocks.items())
        free_order = {block_id: rank for rank, block_id in enumerate(list(self.free_blocks))}
        in_use = len(free_order)  # ranks past every free block's: in use is most recent

        def recency(item: tuple[BlockHash, int]) -> int:
            return free_order.get(item[1], in_use)

        cached.sort(key=recency, reverse=True)
        return [digest for digest, _ in cached[:limit]]

    # ------------------------------------------------------------------ allocation

    def match_prefix(self, seq: Sequence) -> int:
        """Adopts cached blocks for the longest cached full-block prefix of a fresh sequence.

        Leaves at least one token to compute, because the step that computes it produces the
        logits the sequence samples from. Returns the number of tokens now computed.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, "prefix matching needs a fresh sequence"
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            # Prompt logprobs need every prompt position's logits, so nothing can be skipped.
            return 0
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        parent = root_hash(seq.params.cache_salt)
        for i in range(max_blocks):
            h = chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block_id = self.cached_blocks.get(h)
            if block_id is None:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * bs
        if not seq.prefix_hit_recorded:
            seq.num_cached_tokens = seq.num_computed_tokens
        return seq.num_computed_tokens

    def record_prefix_hit(self, seq: Sequence) -> None:
        """Counts a sequence's prompt lookup in the hit rate, once: called when its admission
        succeeds, so a lookup retried while blocks are short (or redone after a preemption)
        does not count its hits again."""
        if seq.prefix_hit_recorded or not self.enable_prefix_caching:
            return
        seq.prefix_hit_recorded = True
        self.stats.queried_tokens += seq.num_tokens
        self.stats.hit_tokens += seq.num_cached_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grows the block table to hold ``num_computed_tokens + num_new_tokens`` tokens.

        All or nothing: returns False, changing nothing, when too few blocks are free.
        """
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            block_id, _ = self.free_blocks.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict its cached contents
                if self.cached_blocks.get(block.block_hash) == block_id:
                    del self.cached_blocks[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def share_prefix(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """Gives `child` the parent's blocks for its first `num_tokens` tokens (whole blocks only)."""
        assert num_tokens % self.block_size == 0 and not child.block_table
        n = num_tokens // self.block_size
        for block_id in parent.block_table[:n]:
            self._take(block_id)
        child.block_table = parent.block_table[:n]
        child.block_hashes = parent.block_hashes[: min(n, len(parent.block_hashes))]
        child.num_computed_tokens = num_tokens

    def commit_computed_blocks(self, seq: Sequence) -> None:
        """Registers the sequence's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else root_hash(seq.params.cache_salt)
            h = chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached_blocks and block.block_hash is None:
                block.block_hash = h
                self.cached_blocks[h] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Drops the sequence's references; blocks reaching zero join the free list.

        Freed in reverse so that a sequence's tail is evicted before its prefix, which other
        requests are more likely to share. Blocks without cached contents go to the front.
        """
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                if block.block_hash is None:
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def hold_block(self, block_id: int) -> None:
        """One more reference to a block, owned by no sequence (KV held for a decode instance)."""
        self._take(block_id)

    def release_block(self, block_id: int) -> None:
        """Drops a `hold_block` reference."""
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double release of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_blocks[block_id] = None
            if block.block_hash is None:
                self.free_blocks.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> None:
        for h, block_id in list(self.cached_blocks.items()):
            if self.blocks[block_id].ref_count == 0:
                self.blocks[block_id].block_hash = None
                del self.cached_blocks[h]

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

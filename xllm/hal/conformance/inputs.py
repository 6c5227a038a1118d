"""Seeded input generation for conformance cases, always on the CPU.

Inputs are made once per case from its seed, in the case's dtype, then each side gets its own
copy on its own device (`to_device`), because ops such as `rotary_embedding` and
`reshape_and_cache` write in place. Paged-attention batches are built here too: random physical
block ids, contexts that cross block borders, and poison values in every cache slot a
sequence does not own, so reading outside the context shows up as a large error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from xllm.hal.metadata import AttentionMetadata, SamplingMetadata


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(
    gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0
) -> torch.Tensor:
    """Normal values drawn in float32 and rounded to `dtype`, so every side sees exact inputs."""
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype)


def to_device(obj: Any, device: torch.device) -> Any:
    """A copy of `obj` (tensor, metadata dataclass, dict, list, tuple) with tensors cloned onto `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, (AttentionMetadata, SamplingMetadata)):
        return dataclasses.replace(
            obj, **{f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        )
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def cos_sin_cache(max_position: int, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    """[max_position, rot_dim] float32: cos in the first rot_dim/2 columns, sin in the rest (vLLM)."""
    return _cos_sin_cache(max_position, rot_dim, base).clone()  # a copy: a buggy op may write to it


@functools.lru_cache(maxsize=16)
def _cos_sin_cache(max_position: int, rot_dim: int, base: float) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(torch.float32)


# ---------------------------------------------------------------------------------- attention


@dataclass
class PagedBatch:
    """A mixed prefill/decode batch already written to a paged cache, ready for `attention`."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    metadata: AttentionMetadata
    owned: torch.Tensor  # [num_blocks * block_size] bool: slots holding a sequence's token


def paged_batch(
    gen: torch.Generator,
    seqs: list[tuple[int, int]],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    sliding_window: int | None = None,
    spare_blocks: int = 3,
) -> PagedBatch:
    """`seqs` holds (cached_prefix_len, query_len) per sequence: query_len 1 after a prefix is a
    decode, a prefix of 0 a fresh prefill, both > 0 a prefill chunk. Every context token's k/v
    is written to the cache (the new ones too, as `reshape_and_cache` would have)."""
    seq_lens = [prefix + qlen for prefix, qlen in seqs]
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    # Physical blocks are a random permutation: a backend that assumes contiguous blocks fails.
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq) + 1  # one unused column, as real block tables have
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # Poison: slots no sequence owns hold large values, so reading them skews the result.
    k_cache = randn(gen, cache_shape, dtype, scale=50.0)
    v_cache = randn(gen, cache_shape, dtype, scale=50.0)
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    tables = torch.zeros((len(seqs), width), dtype=torch.int32)
    slot_mapping: list[int] = []
    new_k, new_v = [], []
    used = 0
    for i, ((prefix, _qlen), seq_len, nblocks) in enumerate(zip(seqs, seq_lens, blocks_per_seq, strict=True)):
        ids = perm[used : used + nblocks]
        used += nblocks
        # Unused columns point at a spare (poisoned) block, never read for a correct backend.
        tables[i] = torch.tensor(ids + [perm[-1]] * (width - nblocks), dtype=torch.int32)
        for t in range(seq_len):
            block, offset = ids[t // block_size], t % block_size
            kt = randn(gen, (num_kv_heads, head_dim), dtype)
            vt = randn(gen, (num_kv_heads, head_dim), dtype)
            k_cache[block, offset] = kt
            v_cache[block, offset] = vt
            owned[block * block_size + offset] = True
            if t >= prefix:
                slot_mapping.append(block * block_size + offset)
                new_k.append(kt)
                new_v.append(vt)
    num_tokens = len(slot_mapping)
    starts = [0]
    for _, qlen in seqs:
        starts.append(starts[-1] + qlen)
    md = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64),
        max_query_len=max(q for _, q in seqs),
        max_seq_len=max(seq_lens),
        scale=head_dim**-0.5,
        sliding_window=sliding_window,
        # The suite fills the host copies, as the engine does (see AttentionMetadata).
        query_start_loc_host=starts,
        seq_lens_host=seq_lens,
    )
    return PagedBatch(
        q=randn(gen, (num_tokens, num_q_heads, head_dim), dtype),
        k=torch.stack(new_k),
        v=torch.stack(new_v),
        k_cache=k_cache,
        v_cache=v_cache,
        metadata=md,
        owned=owned,
    )


# ---------------------------------------------------------------------------------- logits


def distinct_logits(gen: torch.Generator, rows: int, vocab_size: int) -> torch.Tensor:
    """float32 [rows, V] logits, distinct within each row and exact in bfloat16 and float16.

    Ties would make argmax, top-k and top-p order implementation-defined, so each row is a random
    choice of distinct bfloat16 values with 1/16 <= |x| <= 8 (all exact in float16 too).
    """
    pool = _logit_pool()
    if vocab_size > pool.numel():
        raise ValueError(f"vocab_size {vocab_size} exceeds the {pool.numel()} distinct values available")
    return torch.stack([pool[torch.randperm(pool.numel(), generator=gen)[:vocab_size]] for _ in range(rows)])


@functools.lru_cache(maxsize=1)
def _logit_pool() -> torch.Tensor:
    """Every bfloat16 value with 1/16 <= |x| <= 8, ascending (about 1.8k of them)."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(torch.float32)
    return torch.unique(bits[torch.isfinite(bits) & (bits.abs() >= 1 / 16) & (bits.abs() <= 8)])


def random_history(gen: torch.Generator, vocab_size: int, length: int) -> list[int]:
    """Token ids with repeats (so frequency counts exceed 1)."""
    if length == 0:
        return []
    distinct = torch.randint(0, vocab_size, (max(1, length // 2),), generator=gen)
    picks = torch.randint(0, distinct.numel(), (length,), generator=gen)
    return distinct[picks].tolist()

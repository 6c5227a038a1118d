"""CPU paged attention against a per-token loop with an explicit softmax."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from xllm.hal import AttentionMetadata


def build_batch(
    cpu,
    seq_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int = 16,
    block_size: int = 4,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
    seed: int = 0,
):
    """Random caches holding every context token (prefix written earlier, new tokens written by
    reshape_and_cache now), non-contiguous block tables, and the batch's q/k/v."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.full((len(seq_lens), max_blocks), 10_000, dtype=torch.int32)  # junk past the end
    used = 0
    slots, ks, vs, qs = [], [], [], []
    for i, (s, ql) in enumerate(zip(seq_lens, query_lens, strict=False)):
        nb = -(-s // block_size)
        tables[i, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
        seq_slots = [int(tables[i, t // block_size]) * block_size + t % block_size for t in range(s)]
        k_all = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_all = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)
        prefix = torch.tensor(seq_slots[: s - ql], dtype=torch.int64)
        cpu.reshape_and_cache(k_all[: s - ql], v_all[: s - ql], k_cache, v_cache, prefix)
        slots += seq_slots[s - ql :]
        ks.append(k_all[s - ql :])
        vs.append(v_all[s - ql :])
        qs.append(torch.randn(ql, num_heads, head_dim, generator=gen).to(dtype))
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    cpu.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    md = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=slot_mapping,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        scale=head_dim**-0.5,
        sliding_window=sliding_window,
    )
    return q, k, v, k_cache, v_cache, md


def reference_attention(q, k_cache, v_cache, md: AttentionMetadata) -> torch.Tensor:
    """One query token at a time: look up each visible key's block, softmax by hand."""
    block_size = k_cache.shape[1]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i in range(md.num_seqs):
        start, end = int(md.query_start_loc[i]), int(md.query_start_loc[i + 1])
        seq_len = int(md.seq_lens[i])
        for j in range(end - start):
            pos = seq_len - (end - start) + j
            lo = 0 if md.sliding_window is None else max(0, pos - md.sliding_window + 1)
            for h in range(num_heads):
                kv_h = h // (num_heads // num_kv_heads)
                keys, values = [], []
                for t in range(lo, pos + 1):
                    block = int(md.block_tables[i, t // block_size])
                    keys.append(k_cache[block, t % block_size, kv_h].float())
                    values.append(v_cache[block, t % block_size, kv_h].float())
                scores = [float(q[start + j, h].float() @ key) * md.scale for key in keys]
                m = max(scores)
                weights = [math.exp(s - m) for s in scores]
                total = sum(weights)
                out[start + j, h] = sum(w / total * val for w, val in zip(weights, values, strict=False))
    return out


CASES = {
    # name: (seq_lens, query_lens, num_heads, num_kv_heads, sliding_window)
    "decode_mha": ([5, 9, 1, 16], [1, 1, 1, 1], 4, 4, None),
    "decode_gqa": ([7, 13, 3], [1, 1, 1], 8, 2, None),
    "decode_mqa": ([6, 11], [1, 1], 4, 1, None),
    "prefill_fresh": ([7, 10], [7, 10], 4, 2, None),
    "prefill_chunk_over_prefix": ([12, 9], [5, 3], 4, 2, None),
    "mixed": ([10, 3, 17, 6], [1, 3, 4, 1], 6, 2, None),
    "sliding_window": ([10, 3, 17, 6], [1, 3, 9, 1], 4, 2, 4),
    "window_one": ([8, 5], [3, 1], 2, 1, 1),
    # More decode rows than one length group (16): rows are grouped by context length.
    "decode_ragged_groups": ([(i * 7) % 37 + 1 for i in range(40)], [1] * 40, 4, 2, None),
    "decode_groups_window": ([(i * 5) % 29 + 1 for i in range(20)], [1] * 20, 4, 1, 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_loop(cpu, case):
    seq_lens, query_lens, nh, nkv, window = CASES[case]
    q, k, v, kc, vc, md = build_batch(cpu, seq_lens, query_lens, nh, nkv, sliding_window=window)
    got = cpu.attention(q, k, v, kc, vc, md)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, reference_attention(q, kc, vc, md), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_attention_half_precision(cpu, dtype, tol):
    q, k, v, kc, vc, md = build_batch(cpu, [10, 3, 17, 6], [1, 3, 4, 1], 4, 2, dtype=dtype, seed=5)
    got = cpu.attention(q, k, v, kc, vc, md)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), reference_attention(q, kc, vc, md), atol=tol * 2, rtol=tol)


def test_padding_rows_just_work(cpu):
    # A decode batch padded as graph replay pads it: one-token rows over block 0, slot -1.
    q, k, v, kc, vc, md = build_batch(cpu, [5, 9], [1, 1], 4, 2, seed=6)
    want = cpu.attention(q, k, v, kc, vc, md)
    pad = 3
    tables = torch.cat([md.block_tables, torch.zeros(pad, md.block_tables.shape[1], dtype=torch.int32)])
    padded = AttentionMetadata(
        query_start_loc=torch.arange(2 + pad + 1, dtype=torch.int32),
        seq_lens=torch.cat([md.seq_lens, torch.ones(pad, dtype=torch.int32)]),
        block_tables=tables,
        slot_mapping=torch.cat([md.slot_mapping, torch.full((pad,), -1, dtype=torch.int64)]),
        max_query_len=1,
        max_seq_len=md.max_seq_len,
        scale=md.scale,
    )
    qp = torch.cat([q, torch.randn(pad, 4, 16)])
    kp, vp = torch.cat([k, torch.randn(pad, 2, 16)]), torch.cat([v, torch.randn(pad, 2, 16)])
    kc_before = kc.clone()
    cpu.reshape_and_cache(kp, vp, kc, vc, padded.slot_mapping)  # rewrites the same slots, skips -1
    assert torch.equal(kc, kc_before)
    got = cpu.attention(qp, kp, vp, kc, vc, padded)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:2], want)


def test_attention_bad_metadata(cpu):
    q, k, v, kc, vc, md = build_batch(cpu, [5, 9], [1, 1], 4, 2)
    with pytest.raises(ValueError, match="'q'"):
        cpu.attention(q[:, :3], k, v, kc, vc, md)
    with pytest.raises(ValueError, match="metadata.block_tables"):
        md.max_seq_len = 1000
        cpu.attention(q, k, v, kc, vc, md)


def test_decode_batch_is_fast(cpu):
    # 64 sequences x 12 layers of decode must be one batched computation per layer, not a loop.
    seq_lens = [int(x) for x in torch.randint(100, 400, (64,), generator=torch.Generator().manual_seed(0))]
    q, k, v, kc, vc, md = build_batch(cpu, seq_lens, [1] * 64, 8, 2, head_dim=64, block_size=16)
    cpu.attention(q, k, v, kc, vc, md)  # warm-up
    start = time.perf_counter()
    for _ in range(12):
        cpu.attention(q, k, v, kc, vc, md)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"12 decode layers over 64 sequences took {elapsed:.2f}s"


def test_long_prefill_is_split_into_query_chunks(cpu, monkeypatch):
    from xllm.backends.cpu import attention as cpu_attention

    q, k, v, kc, vc, md = build_batch(cpu, [23, 4], [19, 1], 4, 2, sliding_window=6, seed=8)
    want = cpu.attention(q, k, v, kc, vc, md)
    monkeypatch.setattr(cpu_attention, "_MAX_SCORE_ELEMENTS", 4 * 23 * 3)  # 3 query rows per chunk
    torch.testing.assert_close(cpu.attention(q, k, v, kc, vc, md), want)
    torch.testing.assert_close(want, reference_attention(q, kc, vc, md), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["mixed", "decode_ragged_groups", "prefill_chunk_over_prefix", "decode_mha"])
def test_lengths_come_from_the_host_copies(cpu, case):
    """Given the metadata's host copies, attention reads no length back from the tensors (not
    even the decode grouping's longest context) and gives the same result."""
    from tests.backends.host_reads import device_only, plain

    seq_lens, query_lens, nh, nkv, window = CASES[case]
    q, k, v, kc, vc, md = build_batch(cpu, seq_lens, query_lens, nh, nkv, sliding_window=window)
    want = cpu.attention(q, k, v, kc, vc, md)
    guarded = device_only(
        dataclasses.replace(
            md, query_start_loc_host=md.query_start_loc.tolist(), seq_lens_host=list(seq_lens)
        )
    )
    got = plain(cpu.attention(q, k, v, kc, vc, guarded))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)

"""Paged causal attention of the CPU reference backend, for mixed prefill/decode batches.

Keys and values are always read from the paged cache [num_blocks, block_size, num_kv_heads,
head_dim] through the block tables (see `AttentionMetadata`). All decode rows (query length 1)
are gathered into one padded batch and attended with torch's fused SDPA; each prefill
chunk is attended on its own, in query chunks that bound the size of the score matrix. Scores,
softmax and the weighted sum are float32; the result is cast back to q's dtype. Lengths that
shape the work (which rows decode, how long each context is) come from the metadata's host
copies, never from reading the tensors back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from xllm.hal.metadata import AttentionMetadata

# Upper bound on the float32 score elements materialised at once by a prefill chunk (256 MiB).
_MAX_SCORE_ELEMENTS = 64 * 1024 * 1024


def _gather_context(
    cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, ctx_len: int
) -> torch.Tensor:
    """[B, num_kv_heads, ctx_len, head_dim] float32: each row's first ctx_len cached tokens.

    Heads go before tokens so the score and value matmuls run on contiguous [L, D] matrices per
    head (BLAS takes the transpose for free); converting and transposing in one copy is several
    times faster than a matmul over the cache's token-major layout.
    """
    block_size = cache.shape[1]
    num_blocks = -(-ctx_len // block_size)
    tables = block_tables[:, :num_blocks].to(torch.int64)
    # Table entries past a sequence's last block may hold anything (padding); point them at
    # block 0 so the gather stays in range. Their tokens are masked out anyway.
    blocks_used = (seq_lens.to(torch.int64) + block_size - 1) // block_size
    in_use = torch.arange(num_blocks).unsqueeze(0) < blocks_used.unsqueeze(1)
    tables = torch.where(in_use, tables, torch.zeros_like(tables))
    ctx = cache[tables].flatten(1, 2)[:, :ctx_len]  # [B, ctx_len, Hkv, D]
    out = torch.empty(ctx.shape[0], ctx.shape[2], ctx_len, ctx.shape[3], dtype=torch.float32)
    return out.copy_(ctx.transpose(1, 2))


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked softmax attention in float32 with grouped KV heads.

    q: [B, Lq, Hq, D]; k, v: [B, Hkv, L, D] float32; mask: [B, Lq, L] True where the key is visible.
    Returns [B, Lq, Hq, D] float32.
    """
    b, lq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    # Query head h uses KV head h // group: view the query heads as [Hkv, group].
    qg = q.to(torch.float32).view(b, lq, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, group * lq, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale).view(b, hkv, group, lq, -1)
    scores.masked_fill_(~mask.view(b, 1, 1, lq, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(b, hkv, group * lq, -1)
    out = torch.matmul(probs, v)  # [B, Hkv, group * Lq, D]
    return out.view(b, hkv, group, lq, d).permute(0, 3, 1, 2, 4).reshape(b, lq, hq, d)


def _visible(
    query_pos: torch.Tensor, ctx_len: int, seq_lens: torch.Tensor, window: int | None
) -> torch.Tensor:
    """[B, Lq, ctx_len] mask: key t is visible to a query at position p iff t <= p, t < seq_len,
    and (with a sliding window) t > p - window."""
    keys = torch.arange(ctx_len).view(1, 1, -1)
    pos = query_pos.unsqueeze(-1)
    mask = (keys <= pos) & (keys < seq_lens.view(-1, 1, 1))
    if window is not None:
        mask &= keys > pos - window
    return mask


# Decode rows are attended in groups of similar context length, each padded only to its own
# longest context: a ragged batch padded as a whole gathers and scores up to twice the keys.
_DECODE_GROUP_ROWS = 16


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    lens: list[int],
    md: AttentionMetadata,
) -> torch.Tensor:
    """One query per sequence (q: [B, Hq, D]) -> float32 [B, Hq, D]; `lens` is `seq_lens` on the host."""
    if len(lens) <= _DECODE_GROUP_ROWS:
        return _decode_group(q, k_cache, v_cache, block_tables, seq_lens, max(lens), md)
    out = torch.empty(q.shape, dtype=torch.float32)
    order = sorted(range(len(lens)), key=lens.__getitem__)
    for first in range(0, len(order), _DECODE_GROUP_ROWS):
        group = order[first : first + _DECODE_GROUP_ROWS]
        rows = torch.tensor(group, dtype=torch.int64)
        # Sorted by length, so the group's last row has its longest context.
        ctx_len = lens[group[-1]]
        out[rows] = _decode_group(q[rows], k_cache, v_cache, block_tables[rows], seq_lens[rows], ctx_len, md)
    return out


def _decode_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    ctx_len: int,
    md: AttentionMetadata,
) -> torch.Tensor:
    """Rows padded to the group's longest context, `ctx_len`.

    The context is gathered once, token-major, and handed to torch's fused SDPA as a transposed
    view, so no second (transposing) copy is made; the mask hides the padding past each
    sequence's length and, with a window, the keys that slid out of it.
    """
    k_ctx = _gather_tokens(k_cache, block_tables, seq_lens, ctx_len)
    v_ctx = _gather_tokens(v_cache, block_tables, seq_lens, ctx_len)
    mask = _visible((seq_lens - 1).view(-1, 1), ctx_len, seq_lens, md.sliding_window)
    b, hq, d = q.shape
    out = F.scaled_dot_product_attention(
        q.to(torch.float32).view(b, hq, 1, d),
        k_ctx.transpose(1, 2),
        v_ctx.transpose(1, 2),
        attn_mask=mask.view(b, 1, 1, ctx_len),
        scale=md.scale,
        enable_gqa=True,  # query head h reads KV head h // (Hq / Hkv)
    )
    return out.view(b, hq, d)


def _gather_tokens(
    cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, ctx_len: int
) -> torch.Tensor:
    """[B, ctx_len, num_kv_heads, head_dim] float32 view of each row's first ctx_len cached tokens."""
    block_size = cache.shape[1]
    num_blocks = -(-ctx_len // block_size)
    tables = block_tables[:, :num_blocks].to(torch.int64)
    # Entries past a sequence's last block may hold anything: point them at block 0 (masked).
    blocks_used = (seq_lens.to(torch.int64) + block_size - 1) // block_size
    in_use = torch.arange(num_blocks).unsqueeze(0) < blocks_used.unsqueeze(1)
    tables = torch.where(in_use, tables, torch.zeros_like(tables))
    return cache[tables].flatten(1, 2)[:, :ctx_len].to(torch.float32)


# A fused kernel of one-token queries (the backend's fast path): (q [B, Hq, D], k_cache, v_cache,
# block_tables [B, W], seq_lens [B], scale, sliding_window) -> float32 [B, Hq, D], or None where
# it does not apply. Row b attends to keys [0, seq_lens[b]) of its table row (within the window).
DecodeKernel = Callable[..., torch.Tensor | None]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    decode_kernel: DecodeKernel | None = None,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = md.num_seqs
    if num_seqs == 0:
        return torch.zeros(num_tokens, num_heads, head_dim, dtype=q.dtype)
    qsl = md.host_query_start_loc()
    pure_decode = num_tokens == num_seqs and qsl == list(range(num_seqs + 1))
    if pure_decode and decode_kernel is not None:
        out = decode_kernel(q, k_cache, v_cache, md.block_tables, md.seq_lens, md.scale, md.sliding_window)
        if out is not None:
            return out.to(q.dtype)
    if decode_kernel is not None and not pure_decode:
        # Every query token is a one-token query over its own causal prefix: the kernel reads
        # each one's keys through its sequence's table row, prefill chunks included (measured
        # faster than the matmul path below from 64-token chunks to 1024-token prompts).
        query_lens = (md.query_start_loc[1:] - md.query_start_loc[:-1]).to(torch.int64)
        ends = md.seq_lens.to(torch.int64) - md.query_start_loc[1:].to(torch.int64)
        token_lens = torch.repeat_interleave(ends, query_lens, output_size=num_tokens)
        token_lens += torch.arange(1, num_tokens + 1)
        tables = torch.repeat_interleave(md.block_tables, query_lens, dim=0, output_size=num_tokens)
        out = decode_kernel(q, k_cache, v_cache, tables, token_lens, md.scale, md.sliding_window)
        if out is not None:
            return out.to(q.dtype)
    lens = md.host_seq_lens()
    seq_lens = md.seq_lens.to(torch.int64)
    if pure_decode:
        # Pure decode (the hot path, and every graph-replayed step): token i is sequence i.
        return _decode(q, k_cache, v_cache, md.block_tables, seq_lens, lens, md).to(q.dtype)

    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=q.dtype)
    query_lens = [b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)]
    decode_rows = [i for i, n in enumerate(query_lens) if n == 1]
    if decode_rows:
        rows = torch.tensor(decode_rows, dtype=torch.int64)
        tokens = torch.tensor([qsl[i] for i in decode_rows], dtype=torch.int64)
        q_rows, tables, row_lens = q[tokens], md.block_tables[rows], seq_lens[rows]
        res = None
        if decode_kernel is not None:
            res = decode_kernel(q_rows, k_cache, v_cache, tables, row_lens, md.scale, md.sliding_window)
        if res is None:
            res = _decode(q_rows, k_cache, v_cache, tables, row_lens, [lens[i] for i in decode_rows], md)
        out[tokens] = res.to(q.dtype)

    # Prefill chunks (query length > 1) one sequence at a time: their lengths differ too much
    # to pad them together without wasting most of the work.
    for i, q_len in enumerate(query_lens):
        if q_len <= 1:
            continue
        start, seq_len = qsl[i], lens[i]
        k_ctx = _gather_context(k_cache, md.block_tables[i : i + 1], seq_lens[i : i + 1], seq_len)
        v_ctx = _gather_context(v_cache, md.block_tables[i : i + 1], seq_lens[i : i + 1], seq_len)
        step = max(1, _MAX_SCORE_ELEMENTS // (num_heads * seq_len))
        for j in range(0, q_len, step):
            lq = min(step, q_len - j)
            # Query token j of the chunk sits at position seq_len - q_len + j.
            pos = torch.arange(seq_len - q_len + j, seq_len - q_len + j + lq).view(1, -1)
            mask = _visible(pos, seq_len, seq_lens[i : i + 1], md.sliding_window)
            res = _attend(q[start + j : start + j + lq].unsqueeze(0), k_ctx, v_ctx, mask, md.scale)
            out[start + j : start + j + lq] = res.squeeze(0).to(q.dtype)
    return out

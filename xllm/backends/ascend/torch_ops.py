"""Plain torch implementations the Ascend backend runs on the NPU where no fused operator fits.

They are written with device-agnostic torch ops only (no host syncs inside the attention path),
so the same code runs on the NPU and is unit-tested on the CPU here:

- `paged_attention`: float32 / graph-capture path of attention. FIA takes fp16/bf16 only, and its
  actual-length lists are host values baked into an ACL graph at capture; this path reads
  ``seq_lens`` / ``query_start_loc`` as device tensors, so a captured graph stays correct.
- `rotary_cos_sin`: the per-token cos/sin tensors `npu_rotary_mul` multiplies by.

Sampling is not here: the backend runs the HAL's reference (`xllm.hal.sampling_ops`) directly.
"""

from __future__ import annotations

import torch

from xllm.hal.metadata import AttentionMetadata

# ---------------------------------------------------------------------------- rotary


def rotary_cos_sin(
    cos_sin_cache: torch.Tensor, positions: torch.Tensor, neox_style: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token float32 cos and sin, [T, 1, rot_dim], laid out for `npu_rotary_mul`.

    The cache holds cos in its first rot_dim/2 columns and sin in the rest. `npu_rotary_mul`
    computes ``x * cos + rotate(x) * sin`` over the full rotated width, so each half-width value
    is repeated: concatenated twice for rotary_mode "half" (NeoX pairs i, i + rot/2) and
    repeated element-wise for "interleave" (GPT-J pairs 2i, 2i+1).
    """
    cos_sin = cos_sin_cache.index_select(0, positions.to(torch.int64)).to(torch.float32)
    cos, sin = cos_sin.chunk(2, dim=-1)
    if neox_style:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    else:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def rotary_mul(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox_style: bool) -> torch.Tensor:
    """What `npu_rotary_mul(x, cos, sin, rotary_mode)` computes, in torch (for tests/fallback)."""
    if neox_style:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------- attention


# Bytes of float32 working set (gathered K and V plus scores) one key chunk may take.
_ATTENTION_CHUNK_BYTES = 256 * 1024 * 1024


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
) -> torch.Tensor:
    """Causal paged attention of a mixed batch, reading every key/value from the cache.

    Queries are scattered into a padded [B, max_query_len] grid and attended against each
    sequence's blocks chunk by chunk with an online softmax (running max and sum, as
    FlashAttention does), so the working set stays under `_ATTENTION_CHUNK_BYTES` whatever the
    context length. Masks come from device tensors (causal, context length, window); shapes and
    the chunk loop depend only on host bounds (max_query_len, max_seq_len) and table sizes, so
    the same code is correct inside a captured graph for any lengths up to those bounds.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads  # query head h reads KV head h // group
    device = q.device
    qsl = md.query_start_loc.to(device=device, dtype=torch.int64)
    seq_lens = md.seq_lens.to(device=device, dtype=torch.int64)
    tables = md.block_tables.to(device=device, dtype=torch.int64)
    num_seqs, table_width = tables.shape
    max_q = max(int(md.max_query_len), 1)
    num_blocks = min(table_width, max(1, -(-int(md.max_seq_len) // block_size)))

    # Token t -> (sequence s, row j inside its chunk).
    tok = torch.arange(num_tokens, device=device)
    seq_of = torch.searchsorted(qsl[1:], tok, right=True).clamp(max=num_seqs - 1)
    row_of = tok - qsl[seq_of]

    # Table entries past a sequence's last block may be padding (anything, even -1); point them
    # at block 0 so the gather stays in range. Their keys are masked out below.
    blocks_used = (seq_lens + block_size - 1) // block_size
    in_use = torch.arange(table_width, device=device).unsqueeze(0) < blocks_used.unsqueeze(1)
    tables = torch.where(in_use, tables, torch.zeros_like(tables))

    q_pad = torch.zeros(num_seqs, max_q, num_heads, head_dim, dtype=torch.float32, device=device)
    q_pad[seq_of, row_of] = q.to(torch.float32)
    q_pad = q_pad.view(num_seqs, max_q, num_kv_heads, group, head_dim)

    query_len = (qsl[1:] - qsl[:-1]).unsqueeze(1)  # [B, 1]
    rows = torch.arange(max_q, device=device).unsqueeze(0)  # [1, Q]
    pos = (seq_lens.unsqueeze(1) - query_len + rows).unsqueeze(2)  # [B, Q, 1] query positions
    pad_row = (rows >= query_len).unsqueeze(2)  # [B, Q, 1] grid rows holding no query

    # Chunk size in blocks from the float32 bytes per key token: K and V rows plus one score per
    # (sequence, query row, head).
    bytes_per_key = 4 * num_seqs * (2 * num_kv_heads * head_dim + num_heads * max_q)
    chunk_blocks = max(1, min(num_blocks, _ATTENTION_CHUNK_BYTES // (bytes_per_key * block_size)))

    shape_stats = (num_seqs, num_kv_heads, group, max_q)
    run_max = torch.full(shape_stats, float("-inf"), device=device)
    run_sum = torch.zeros(shape_stats, device=device)
    acc = torch.zeros(num_seqs, max_q, num_kv_heads, group, head_dim, device=device)
    for first in range(0, num_blocks, chunk_blocks):
        chunk = tables[:, first : min(first + chunk_blocks, num_blocks)]
        n = chunk.shape[1] * block_size
        keys = k_cache[chunk].reshape(num_seqs, n, num_kv_heads, head_dim).to(torch.float32)
        values = v_cache[chunk].reshape(num_seqs, n, num_kv_heads, head_dim).to(torch.float32)
        key_pos = (first * block_size + torch.arange(n, device=device)).view(1, 1, n)
        visible = key_pos <= pos  # causal; keys < seq_len follow since pos < seq_len
        if md.sliding_window is not None:
            visible &= key_pos > pos - md.sliding_window
        visible |= pad_row & (key_pos == 0)  # a padding row sees key 0, so no row is empty (NaN)
        scores = torch.einsum("bqhgd,bkhd->bhgqk", q_pad, keys) * md.scale
        scores = scores.masked_fill(~visible.view(num_seqs, 1, 1, max_q, n), float("-inf"))
        new_max = torch.maximum(run_max, scores.amax(dim=-1))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # no inf - inf
        rescale = torch.exp(run_max - safe_max)
        probs = torch.exp(scores - safe_max.unsqueeze(-1))
        run_sum = run_sum * rescale + probs.sum(dim=-1)
        acc = acc * rescale.permute(0, 3, 1, 2).unsqueeze(-1) + torch.einsum(
            "bhgqk,bkhd->bqhgd", probs, values
        )
        run_max = new_max
    out = acc / run_sum.permute(0, 3, 1, 2).unsqueeze(-1)
    return out.reshape(num_seqs, max_q, num_heads, head_dim)[seq_of, row_of].to(q.dtype)

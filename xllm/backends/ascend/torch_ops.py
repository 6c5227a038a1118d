"""Plain torch implementations the Ascend backend runs on the NPU where no fused operator fits.

They are written with device-agnostic torch ops only (no host syncs inside the attention path),
so the same code runs on the NPU and is unit-tested on the CPU here:

- `paged_attention`: float32 / graph-capture path of attention. FIA takes fp16/bf16 only, and its
  actual-length lists are host values baked into an ACL graph at capture; this path reads
  ``seq_lens`` / ``query_start_loc`` as device tensors, so a captured graph stays correct.
- `rotary_cos_sin`: the per-token cos/sin tensors `npu_rotary_mul` multiplies by.
- `processed_logits` / `sample`: logits processing and inverse-CDF sampling with torch ops on the
  device (torch_npu has no fused op with the HAL's penalty/top-k/top-p/min-p semantics).
"""

from __future__ import annotations

import torch

from xllm.backends.ascend.translation import SamplingPlan
from xllm.hal.metadata import AttentionMetadata, SampleOutput, SamplingMetadata, mask_banned_tokens

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


# ---------------------------------------------------------------------------- sampling


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] occurrence counts; the padding id vocab_size lands in a spare column, dropped."""
    ids = token_ids.to(torch.int64).clamp(0, vocab_size)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def _apply_penalties(logits: torch.Tensor, sm: SamplingMetadata) -> None:
    rows, vocab_size = logits.shape
    empty = torch.full((rows, 1), vocab_size, dtype=torch.int64, device=logits.device)
    out_ids = sm.output_token_ids if sm.output_token_ids is not None else empty
    prompt_ids = sm.prompt_token_ids if sm.prompt_token_ids is not None else empty
    output_counts = _token_counts(out_ids.to(logits.device), vocab_size)
    prompt_counts = _token_counts(prompt_ids.to(logits.device), vocab_size)
    # Repetition (CTRL / HF): seen tokens' positive logits are divided, negative ones multiplied.
    seen = (output_counts > 0) | (prompt_counts > 0)
    rep = sm.repetition_penalty.to(logits.device, torch.float32).unsqueeze(1)
    logits.copy_(torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits))
    # Presence / frequency (OpenAI, vLLM): output tokens only.
    freq = sm.frequency_penalty.to(logits.device, torch.float32).unsqueeze(1)
    pres = sm.presence_penalty.to(logits.device, torch.float32).unsqueeze(1)
    logits -= freq * output_counts + pres * (output_counts > 0)


def processed_logits(logits: torch.Tensor, sm: SamplingMetadata, plan: SamplingPlan) -> torch.Tensor:
    """penalties -> temperature -> top-k -> top-p -> min-p, float32, removed tokens -inf."""
    out = logits.to(torch.float32, copy=True)
    device = out.device
    vocab_size = out.shape[1]
    mask_banned_tokens(out, sm)
    if plan.apply_penalties:
        _apply_penalties(out, sm)
    if not plan.apply_temperature:
        return out
    temperature = sm.temperature.to(device, torch.float32)
    greedy = temperature <= 0
    # Greedy rows keep their penalised logits: divide by 1 and switch their filters off.
    out /= torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    if plan.apply_top_k or plan.apply_top_p:
        sorted_logits, order = out.sort(dim=-1, descending=False)
        if plan.apply_top_k:
            top_k = sm.top_k.to(device, torch.int64)
            k = torch.where((top_k > 0) & ~greedy, top_k.clamp(max=vocab_size), vocab_size)
            kth = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))
            sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))  # ties with the k-th stay (HF)
        if plan.apply_top_p:
            top_p = torch.where(greedy, torch.ones_like(temperature), sm.top_p.to(device, torch.float32))
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = (cum <= (1.0 - top_p).unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
            drop[:, -1] = False  # the most likely token always survives
            sorted_logits.masked_fill_(drop, float("-inf"))
        out = torch.empty_like(out).scatter_(1, order, sorted_logits)
    if plan.apply_min_p:
        min_p = torch.where(
            greedy, torch.zeros_like(temperature), sm.min_p.to(device, torch.float32)
        ).unsqueeze(1)
        probs = out.softmax(dim=-1)
        out.masked_fill_(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return out


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token j of each row with ``cdf[j-1] <= u * total < cdf[j]``: an exact draw from probs.

    A zero-probability token repeats the previous cdf value, so it is never the first entry above
    the target. float64 accumulation, as the CPU reference does, so both pick the same token.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp_(max=probs.shape[1] - 1)


def sample(logits: torch.Tensor, sm: SamplingMetadata, plan: SamplingPlan) -> SampleOutput:
    if not plan.apply_penalties and not plan.random_rows and not plan.apply_temperature and sm.banned is None:
        tokens = logits.argmax(dim=-1)
    else:
        processed = processed_logits(logits, sm, plan)
        tokens = processed.argmax(dim=-1)
        if plan.random_rows:
            rows = torch.tensor(plan.random_rows, dtype=torch.int64).to(logits.device, non_blocking=True)
            uniforms = torch.tensor(plan.uniforms, dtype=torch.float64).to(logits.device, non_blocking=True)
            probs = processed.index_select(0, rows).softmax(dim=-1)
            tokens[rows] = inverse_cdf(probs, uniforms)
    tokens = tokens.to(torch.int64)
    if plan.num_logprobs < 0:
        return SampleOutput(sampled_token_ids=tokens)
    logprobs = logits.to(torch.float32).log_softmax(dim=-1)  # raw logits, as OpenAI/vLLM report
    sampled = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top_values, top_ids = logprobs.topk(plan.num_logprobs, dim=-1, largest=True, sorted=True)
    return SampleOutput(
        sampled_token_ids=tokens,
        sampled_logprobs=sampled,
        top_logprobs=top_values,
        top_token_ids=top_ids.to(torch.int64),
    )

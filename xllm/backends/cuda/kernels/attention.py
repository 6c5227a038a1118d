"""Paged attention for a mixed batch of prefill chunks and decodes, in Triton.

One kernel serves the whole batch (the shape of vLLM's ``triton_unified_attention``): a program
takes a block of ``BLOCK_Q`` query tokens of one sequence and *one KV head*, and stacks the
``GROUP`` query heads that share that KV head (GQA/MQA) as rows, so its ``BLOCK_M = BLOCK_Q *
GROUP`` rows reuse each K/V tile it loads from the paged cache: every KV block is read once per
group, not once per query head. It walks the keys ``[lo, hi)`` the block can see (causal over the
cached prefix plus the chunk's own earlier tokens, cut below by the sliding window), gathers each
tile through the block table, and keeps the flash-attention running softmax (FlashAttention-2,
Dao 2023: running max ``m``, running sum ``l``, rescaled accumulator) in float32, in base 2.

For decode-only batches with long contexts and too few (sequence, KV head) programs to fill the
GPU, the same kernel runs split-KV ("flash-decoding", Dao et al. 2023): a third grid axis cuts the
key range into ``NUM_SPLITS`` pieces, each program writes its un-normalised partial accumulator and
its (m, l), and `_combine_splits_kernel` merges them with the log-sum-exp rescaling.

Grids depend only on host-side sizes (token count, sequence count, the batch's max query length),
never on device values, so a decode step launches the same grids inside a captured CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from xllm.backends.cuda.kernels.common import cast

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # The interpreter's dot is wrong for bf16 (NumPy has no bf16 and multiplies the raw bits), so
    # interpreted runs upcast; float32 on a GPU asks for IEEE precision, not TF32, so fp32 results
    # match the reference to fp32 accuracy.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,  # [T, num_q_heads, NUM_SPLITS, HEAD_PAD] float32 (split-KV only)
    part_m_ptr,  # [T, num_q_heads, NUM_SPLITS] float32, running max in base 2 (split-KV only)
    part_l_ptr,  # [T, num_q_heads, NUM_SPLITS] float32, running sum (split-KV only)
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    num_seqs,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2 (exp2 is the fast path)
    window,  # sliding window in tokens (ignored unless SLIDING)
    block_size,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    num_q_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program: power of two >= BLOCK_Q * GROUP
    TILE_N: tl.constexpr,  # keys per iteration
    NUM_SPLITS: tl.constexpr,
    ONE_BLOCK_PER_SEQ: tl.constexpr,  # every sequence's query fits one block: program i = sequence i
    SLIDING: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_q = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Which sequence and which of its query blocks this program owns. Sequence i's blocks are
    # numbered from query_start_loc[i] // BLOCK_Q + i (an upper bound on the blocks before it),
    # so the grid is sized from host-side counts and a binary search inverts the numbering.
    if ONE_BLOCK_PER_SEQ:
        seq = pid_q
        q_block = 0
    else:
        # Built as tensors: an int argument equal to 1 is specialised to a constant by triton,
        # and a loop-carried variable must keep one type.
        lo_s = tl.zeros([], dtype=tl.int32)
        hi_s = tl.zeros([], dtype=tl.int32) + num_seqs
        while lo_s < hi_s:
            mid = (lo_s + hi_s) // 2
            first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
            if first_block <= pid_q:
                lo_s = mid + 1
            else:
                hi_s = mid
        seq = lo_s - 1
        q_block = pid_q - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)

    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q_start).to(tl.int32)
    if q_block * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_len = seq_len - q_len  # cached prefix before this step's tokens

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_PAD)
        q_idx = q_block * BLOCK_Q + offs_m // GROUP  # query token within the sequence
        head = kv_head * GROUP + offs_m % GROUP
        row_ok = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
        q_pos = ctx_len + q_idx  # absolute position of each row's token
        d_ok = offs_d < HEAD_DIM

        q_rows = (q_start + q_idx).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )

        # Keys this block can see: up to its last token (causal), from its first token's window.
        last_q = tl.minimum((q_block + 1) * BLOCK_Q, q_len) - 1
        hi = ctx_len + last_q + 1
        lo = 0
        if SLIDING:
            lo = tl.maximum(ctx_len + q_block * BLOCK_Q - window + 1, 0)
        lo = (lo // TILE_N) * TILE_N
        if NUM_SPLITS > 1:
            per_split = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), TILE_N) * TILE_N
            lo = lo + split * per_split
            hi = tl.minimum(hi, lo + per_split)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

        for start in range(lo, hi, TILE_N):
            k_pos = start + tl.arange(0, TILE_N)
            k_ok = k_pos < hi
            # Gather each key's physical block: tiles need not align with cache blocks, so any
            # block_size works; a tile inside one block reads contiguous rows.
            blk = tl.load(bt_row + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
            off = (k_pos % block_size).to(tl.int64)
            kt = tl.load(
                k_cache_ptr
                + blk[None, :] * stride_kb
                + off[None, :] * stride_ks
                + kv_head * stride_kh
                + offs_d[:, None],
                mask=k_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            s = _dot(q, kt, UPCAST, IEEE) * qk_scale

            visible = k_pos[None, :] <= q_pos[:, None]
            mask = row_ok[:, None] & k_ok[None, :] & visible
            if SLIDING:
                mask = mask & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(mask, s, float("-inf"))

            # Online softmax. A row may have seen no visible key yet (window not reached, padding
            # row): its max stays -inf, so subtract 0 instead to keep exp2 from producing NaN.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(
                v_cache_ptr
                + blk[:, None] * stride_vb
                + off[:, None] * stride_vs
                + kv_head * stride_vh
                + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            # On a GPU, P is rounded to V's dtype to use the tensor cores (as FlashAttention does);
            # the interpreter multiplies in float32 anyway, so it keeps P exact.
            if UPCAST:
                pv = _dot(p, vt, UPCAST, IEEE)
            else:
                pv = _dot(p.to(vt.dtype), vt, UPCAST, IEEE)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if NUM_SPLITS > 1:
            part = (q_rows * num_q_heads + head) * NUM_SPLITS + split
            tl.store(part_acc_ptr + part[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
            tl.store(part_m_ptr + part, m_i, mask=row_ok)
            tl.store(part_l_ptr + part, l_i, mask=row_ok)
        else:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(
                out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                cast(out, out_ptr.dtype.element_ty, UPCAST),
                mask=row_ok[:, None] & d_ok[None, :],
            )


@triton.jit
def _combine_splits_kernel(
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    num_q_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Flash-decoding reduction: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with
    # M = max_s m_s. Empty splits carry m = -inf and l = 0 and drop out.
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    s_ok = offs_s < NUM_SPLITS
    base = (token * num_q_heads + head) * NUM_SPLITS
    m = tl.load(part_m_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    l_part = tl.load(part_l_ptr + base + offs_s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    acc = tl.load(
        part_acc_ptr + (base + offs_s)[:, None] * HEAD_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0
    )
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l_part * w, 0)
    out = num / tl.where(den == 0.0, 1.0, den)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + offs_d,
        cast(out, out_ptr.dtype.element_ty, INTERPRET),
        mask=offs_d < HEAD_DIM,
    )


# Split-KV heuristic constants: a split should still hold a few tiles of keys, and past about 16
# splits the reduction and the partial buffers cost more than the extra parallelism brings.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int, num_sms: int
) -> int:
    """How many KV splits to use: >1 only for decode-only batches that would leave SMs idle.

    With one program per (sequence, KV head), a small decode batch over a long context keeps a
    few SMs busy walking thousands of keys; splitting the keys fills the rest (flash-decoding).
    """
    if max_query_len != 1 or max_seq_len < 2 * MIN_KEYS_PER_SPLIT:
        return 1
    programs = num_seqs * num_kv_heads
    target = 2 * num_sms  # two programs per SM hides the latency of the gathered loads
    if programs >= target:
        return 1
    return max(1, min(MAX_SPLITS, math.ceil(target / programs), max_seq_len // MIN_KEYS_PER_SPLIT))


def attention_tiles(
    head_dim: int, group: int, max_query_len: int, dtype: torch.dtype, interpret: bool
) -> tuple[int, int, int, int, int]:
    """(HEAD_PAD, BLOCK_M, BLOCK_Q, TILE_N, num_stages) for a launch, in one place so that the
    compile test (tests/backends/cuda/compile_kernels.py) builds exactly what launches."""
    head_pad = max(16, triton.next_power_of_2(head_dim))  # tl.dot wants every dim >= 16
    # Tile sizes. Rows per program: enough query tokens to fill 64 rows with the group, at
    # least 16 (tl.dot's minimum). Keys per iteration: 64. Under the interpreter each program
    # costs NumPy calls rather than SM time, so tiles stay small. float32 tiles take twice the
    # shared memory of 16-bit ones (~115 KB at 64x64x128 with the pipeline), more than the ~99 KB
    # of sm_86/sm_89 parts, so they are halved, as are tiles of 256-wide heads; float32 with
    # 256-wide heads halves again and pipelines 2 deep. compile_kernels.py checks the budget.
    wide = head_pad >= 256 or dtype == torch.float32
    widest = head_pad >= 256 and dtype == torch.float32
    rows = 16 if interpret or widest else (32 if wide else 64)
    block_m = max(16, triton.next_power_of_2(group), rows if max_query_len > 1 else 16)
    block_q = max(1, block_m // group)
    if max_query_len == 1:
        block_q = 1
        block_m = max(16, triton.next_power_of_2(group))
    tile_n = 16 if widest else (32 if interpret or wide else 64)
    num_stages = 2 if widest else 3
    return head_pad, block_m, block_q, tile_n, num_stages


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    sliding_window: int | None,
    *,
    interpret: bool,
    num_splits: int | None = None,
    num_sms: int = 132,
) -> torch.Tensor:
    """Launches the unified kernel (and the split reduction when used); returns [T, Hq, D].

    `num_splits` forces the split count (tests use it to cover the split path on small shapes);
    None lets `choose_num_splits` decide.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("attention: the KV cache's head_dim must be contiguous")
    # The kernel indexes these with unit inner strides (no-ops for the usual contiguous inputs).
    query_start_loc, seq_lens = query_start_loc.contiguous(), seq_lens.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out

    head_pad, block_m, block_q, tile_n, num_stages = attention_tiles(
        head_dim, group, max_query_len, q.dtype, interpret
    )

    one_block = max_query_len <= block_q
    num_q_blocks = num_seqs if one_block else num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len, num_sms)
    num_splits = max(1, int(num_splits))

    if num_splits > 1:
        part_acc = torch.empty(
            (num_tokens, num_q_heads, num_splits, head_pad), dtype=torch.float32, device=q.device
        )
        part_m = torch.empty((num_tokens, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused; any pointer will do

    grid = (num_q_blocks, num_kv_heads, num_splits)
    paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        part_acc,
        part_m,
        part_l,
        query_start_loc,
        seq_lens,
        block_tables,
        num_seqs,
        scale * LOG2E,
        sliding_window or 0,
        k_cache.shape[1],
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        num_q_heads,
        HEAD_DIM=head_dim,
        HEAD_PAD=head_pad,
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE_N=tile_n,
        NUM_SPLITS=num_splits,
        ONE_BLOCK_PER_SEQ=one_block,
        SLIDING=sliding_window is not None,
        UPCAST=interpret,
        IEEE=q.dtype == torch.float32,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_q_heads)](
            part_acc,
            part_m,
            part_l,
            out,
            out.stride(0),
            out.stride(1),
            num_q_heads,
            HEAD_DIM=head_dim,
            HEAD_PAD=head_pad,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
            INTERPRET=interpret,
        )
    return out

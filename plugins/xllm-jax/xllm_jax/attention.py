"""Paged causal attention in jax.numpy under jax.jit, for mixed prefill/decode batches.

Semantics are the HAL's (`AttentionMetadata`, and the CPU reference in
xllm/backends/cpu/attention.py): sequence i's queries are its last ``q_len`` tokens, query j sits
at position ``seq_len - q_len + j`` and sees keys ``t <= position``, ``t < seq_len`` and, with a
window W, ``t > position - W``; query head h reads KV head ``h // (Hq / Hkv)``; keys and values
come from the paged cache through the block tables; scores, softmax and P @ V are float32.

jit needs static shapes, so the batch is cut on the host into *rows*: one row is one sequence's
run of query tokens (a decode is a row of one). Rows of one call share a padded query length and
a padded context length (both bucketed), and every row's result is scattered back to its tokens
inside the kernel. Decodes and prefill chunks go in separate calls, so a batch of decodes never
pays for a long prefill's padding, and long prefills are split into query chunks that bound the
score matrix. Padding rows are empty (q_len 0, seq_len 1 over block 0): they compute a finite
result and scatter nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import xllm_jax.xla_flags  # noqa: F401  (before the first JAX computation)
from xllm_jax.bridge import bucket

F32 = jnp.float32
_PRECISE = jax.lax.Precision.HIGHEST
# Upper bound on the float32 score elements one call materialises (256 MiB), as the reference.
MAX_SCORE_ELEMENTS = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Rows:
    """Host description of one kernel call's rows (before padding to a bucket)."""

    seq: list[int]  # which sequence (row of the block tables) each row reads
    start: list[int]  # first query token of the row in the flattened batch
    q_len: list[int]  # query tokens in the row
    ctx_len: list[int]  # keys the row may see: its last query's position + 1


def plan_rows(query_start_loc: list[int], seq_lens: list[int], num_heads: int) -> list[Rows]:
    """Splits a batch into kernel calls: all decodes in one, prefill chunks in calls whose score
    matrix stays under MAX_SCORE_ELEMENTS (a long chunk is cut into query pieces)."""
    decode = Rows([], [], [], [])
    pieces: list[tuple[int, int, int, int]] = []
    for i, seq_len in enumerate(seq_lens):
        start, q_len = query_start_loc[i], query_start_loc[i + 1] - query_start_loc[i]
        if q_len == 0:
            continue
        if q_len == 1:
            decode.seq.append(i)
            decode.start.append(start)
            decode.q_len.append(1)
            decode.ctx_len.append(seq_len)
            continue
        step = max(1, MAX_SCORE_ELEMENTS // (num_heads * bucket(seq_len)))
        for j in range(0, q_len, step):
            lq = min(step, q_len - j)
            # A piece ending before the chunk's last token sees keys up to its own last position.
            pieces.append((i, start + j, lq, seq_len - q_len + j + lq))
    calls = [decode] if decode.seq else []
    current = Rows([], [], [], [])
    for seq, start, lq, ctx in pieces:
        grown = len(current.seq) + 1
        q_pad = bucket(max([lq, *current.q_len]))
        kv_pad = bucket(max([ctx, *current.ctx_len]))
        if current.seq and bucket(grown) * num_heads * q_pad * kv_pad > MAX_SCORE_ELEMENTS:
            calls.append(current)
            current = Rows([], [], [], [])
        current.seq.append(seq)
        current.start.append(start)
        current.q_len.append(lq)
        current.ctx_len.append(ctx)
    if current.seq:
        calls.append(current)
    return calls


def row_arrays(
    rows: Rows, block_tables: np.ndarray, block_size: int
) -> tuple[dict[str, np.ndarray], int, int]:
    """Padded host arrays for one call, with its static query and context-block bucket sizes."""
    n = bucket(len(rows.seq))
    pad = n - len(rows.seq)
    q_rows = bucket(max(rows.q_len))
    num_blocks = bucket(-(-max(rows.ctx_len) // block_size))
    tables = block_tables[np.asarray(rows.seq, dtype=np.int64)]
    width = tables.shape[1]
    if width >= num_blocks:
        tables = tables[:, :num_blocks]
    else:  # beyond the table's reach every key is masked; block 0 keeps the gather in range
        tables = np.pad(tables, ((0, 0), (0, num_blocks - width)))
    arrays = {
        "tables": np.pad(tables.astype(np.int32), ((0, pad), (0, 0))),
        "start": np.asarray(rows.start + [0] * pad, dtype=np.int32),
        "q_len": np.asarray(rows.q_len + [0] * pad, dtype=np.int32),
        "ctx_len": np.asarray(rows.ctx_len + [1] * pad, dtype=np.int32),
    }
    return arrays, q_rows, num_blocks


@functools.partial(jax.jit, static_argnames=("q_rows", "scale", "window"))
def attend_rows(
    out: jax.Array,
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    tables: jax.Array,
    start: jax.Array,
    q_len: jax.Array,
    ctx_len: jax.Array,
    *,
    q_rows: int,
    scale: float,
    window: int | None,
) -> jax.Array:
    """Attends every row's queries and scatters the results into `out` [T, Hq, D] (returned).

    tables [R, nb]; start, q_len, ctx_len [R]; q_rows: the padded query length of a row.
    """
    num_rows, num_blocks = tables.shape
    num_cache_blocks, block_size, hkv, d = k_cache.shape
    hq = q.shape[1]
    group = hq // hkv
    ctx = num_blocks * block_size
    # Table entries past a row's last block may hold anything: point them at block 0 (masked).
    used = (ctx_len + block_size - 1) // block_size
    in_use = jnp.arange(num_blocks, dtype=jnp.int32)[None, :] < used[:, None]
    tables = jnp.clip(jnp.where(in_use, tables, 0), 0, num_cache_blocks - 1)
    k_ctx = k_cache[tables].reshape(num_rows, ctx, hkv, d).astype(F32)
    v_ctx = v_cache[tables].reshape(num_rows, ctx, hkv, d).astype(F32)

    j = jnp.arange(q_rows, dtype=jnp.int32)
    token = start[:, None] + j[None, :]  # [R, Qr]
    real = j[None, :] < q_len[:, None]
    queries = q[jnp.clip(token, 0, q.shape[0] - 1)].astype(F32)  # [R, Qr, Hq, D]
    # Query j of a row sits at ctx_len - q_len + j (padded queries land past it: harmless).
    pos = (ctx_len - q_len)[:, None] + j[None, :]
    keys = jnp.arange(ctx, dtype=jnp.int32)[None, None, :]
    visible = (keys <= pos[..., None]) & (keys < ctx_len[:, None, None])
    if window is not None:
        visible &= keys > pos[..., None] - window

    qg = queries.reshape(num_rows, q_rows, hkv, group, d)
    scores = jnp.einsum("rqhgd,rkhd->rhgqk", qg, k_ctx, precision=_PRECISE) * scale
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    res = jnp.einsum("rhgqk,rkhd->rqhgd", probs, v_ctx, precision=_PRECISE)
    res = res.reshape(num_rows, q_rows, hq, d).astype(out.dtype)
    # Padded queries and rows aim past the end and are dropped.
    target = jnp.where(real, token, out.shape[0])
    return out.at[target].set(res, mode="drop")

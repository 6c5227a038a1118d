"""Logits processing and seeded sampling in jax.numpy under jax.jit, to the HAL's semantics.

The meaning is `xllm.hal.sampling_ops` (HF's order: banned tokens, repetition then presence and
frequency penalties, temperature, top-k, top-p, min-p; greedy rows get the ban and penalties
only), step by step in JAX. The random stream is not re-implemented: row i's one uniform comes
from the HAL's own host helper (`sampling_ops.random_draws`: a CPU MT19937 generator seeded with
``row_seed(seed, step)``), so the same seed draws the reference's token whenever the processed
probabilities agree; the inverse CDF over the float64 cumulative sum is JAX. The host summaries
of `SamplingMetadata` (all_greedy, no_penalties, ...) become static arguments, so a batch that
uses no penalties compiles no penalty code.

Shapes are bucketed (rows, token-history width, banned pairs) so that batches of different sizes
reuse compilations; padded rows are zero logits that nothing reads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from xllm.hal import sampling_ops
from xllm.hal.metadata import SampleOutput, SamplingMetadata

import xllm_jax.xla_flags  # noqa: F401  (before the first JAX computation)
from xllm_jax.bridge import bucket, pad_rows, to_jax, to_torch

F32 = jnp.float32
NEG_INF = -jnp.inf


def _token_counts(ids: jax.Array, vocab_size: int) -> jax.Array:
    # The padding id vocab_size lands in a spare column, which is dropped.
    ids = jnp.clip(ids, 0, vocab_size)
    rows = jnp.arange(ids.shape[0])[:, None]
    counts = jnp.zeros((ids.shape[0], vocab_size + 1), jnp.int32).at[rows, ids].add(1)
    return counts[:, :vocab_size]


def _penalties(logits: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    vocab_size = logits.shape[1]
    output_counts = _token_counts(p["output_ids"], vocab_size)
    prompt_counts = _token_counts(p["prompt_ids"], vocab_size)
    seen = (output_counts > 0) | (prompt_counts > 0)
    rep = p["repetition_penalty"][:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    freq = p["frequency_penalty"][:, None]
    pres = p["presence_penalty"][:, None]
    return logits - (freq * output_counts + pres * (output_counts > 0))


def _mask_top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    vocab_size = logits.shape[1]
    enabled = top_k > 0
    k = jnp.clip(top_k, 1, vocab_size)
    descending = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=1)
    kth = jnp.where(enabled[:, None], kth, NEG_INF)
    return jnp.where(logits < kth, NEG_INF, logits)  # ties with the k-th value stay, as in HF


def _mask_top_k_top_p(logits: jax.Array, top_k: jax.Array | None, top_p: jax.Array) -> jax.Array:
    rows, vocab_size = logits.shape
    order = jnp.argsort(logits, axis=-1)  # ascending, as the reference sorts
    ranked = jnp.take_along_axis(logits, order, axis=1)
    if top_k is not None:
        k = jnp.where(top_k > 0, jnp.clip(top_k, max=vocab_size), vocab_size)
        kth = jnp.take_along_axis(ranked, (vocab_size - k)[:, None], axis=1)
        ranked = jnp.where(ranked < kth, NEG_INF, ranked)
    # Drop the low tail whose mass is <= 1 - top_p; the top token always stays; a disabled row
    # (top_p 1) must not lose its zero-probability tokens.
    cum = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
    drop = (cum <= (1.0 - top_p)[:, None]) & (top_p < 1.0)[:, None]
    drop = drop.at[:, -1].set(False)
    ranked = jnp.where(drop, NEG_INF, ranked)
    return jnp.zeros_like(logits).at[jnp.arange(rows)[:, None], order].set(ranked)


def _mask_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(logits, axis=-1)
    cut = min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < cut, NEG_INF, logits)


@functools.partial(
    jax.jit, static_argnames=("all_greedy", "no_penalties", "no_top_k", "no_top_p", "no_min_p")
)
def processed(
    logits: jax.Array,
    p: dict[str, jax.Array],
    *,
    all_greedy: bool,
    no_penalties: bool,
    no_top_k: bool,
    no_top_p: bool,
    no_min_p: bool,
) -> jax.Array:
    out = logits
    banned = p["banned"]  # [N, 2] (row, token); padding pairs name a row past the batch
    out = out.at[banned[:, 0], banned[:, 1]].set(NEG_INF, mode="drop")
    if not no_penalties:
        out = _penalties(out, p)
    if all_greedy:
        return out
    temperature = p["temperature"]
    greedy = temperature <= 0
    out = out / jnp.where(greedy, 1.0, temperature)[:, None]
    top_k = None if no_top_k else jnp.where(greedy, 0, p["top_k"])
    if not no_top_p:
        out = _mask_top_k_top_p(out, top_k, jnp.where(greedy, 1.0, p["top_p"]))
    elif top_k is not None:
        out = _mask_top_k(out, top_k)
    if not no_min_p:
        out = _mask_min_p(out, jnp.where(greedy, 0.0, p["min_p"]))
    return out


@jax.jit
def _draw(processed_logits: jax.Array, uniforms: jax.Array, random: jax.Array) -> jax.Array:
    """Greedy argmax, or for random rows the inverse CDF of softmax(processed) at their uniform
    (float64 cumulative sum: token j with cdf[j-1] <= u * total < cdf[j])."""
    tokens = jnp.argmax(processed_logits, axis=-1)
    cdf = jnp.cumsum(jax.nn.softmax(processed_logits, axis=-1).astype(jnp.float64), axis=-1)
    target = uniforms * cdf[:, -1]
    drawn = jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="right"))(cdf, target)
    drawn = jnp.minimum(drawn, processed_logits.shape[1] - 1)
    return jnp.where(random, drawn, tokens).astype(jnp.int64)


@jax.jit
def _argmax(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int64)


@functools.partial(jax.jit, static_argnames=("k",))
def _logprobs(logits: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    sampled = jnp.take_along_axis(logprobs, tokens[:, None], axis=1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logprobs, k)
    return sampled, top_values, top_ids.astype(jnp.int64)


# ---------------------------------------------------------------------------------- host side


def _padded_ids(ids: torch.Tensor | None, rows: int, vocab_size: int) -> np.ndarray:
    """A token-history matrix padded to (rows, bucketed width) with the padding id vocab_size."""
    if ids is None:
        return np.full((rows, 1), vocab_size, dtype=np.int64)
    host = ids.detach().to("cpu", torch.int64).numpy()
    width = bucket(host.shape[1])
    return np.pad(host, ((0, rows - host.shape[0]), (0, width - host.shape[1])), constant_values=vocab_size)


def _params(sm: SamplingMetadata, rows: int, vocab_size: int) -> dict[str, jax.Array]:
    def col(t: torch.Tensor, dtype: torch.dtype, pad: float) -> jax.Array:
        return to_jax(pad_rows(t.detach().to("cpu", dtype), rows, pad))

    banned = sm.banned.detach().to("cpu", torch.int64) if sm.banned is not None else None
    n = 0 if banned is None else banned.shape[0]
    pairs = np.full((bucket(max(n, 1)), 2), [rows, 0], dtype=np.int64)  # row past the batch: dropped
    if n:
        pairs[:n] = banned.numpy()
    return {
        "temperature": col(sm.temperature, torch.float32, 1.0),
        "top_k": col(sm.top_k, torch.int64, 0),
        "top_p": col(sm.top_p, torch.float32, 1.0),
        "min_p": col(sm.min_p, torch.float32, 0.0),
        "repetition_penalty": col(sm.repetition_penalty, torch.float32, 1.0),
        "presence_penalty": col(sm.presence_penalty, torch.float32, 0.0),
        "frequency_penalty": col(sm.frequency_penalty, torch.float32, 0.0),
        "prompt_ids": jax.device_put(_padded_ids(sm.prompt_token_ids, rows, vocab_size)),
        "output_ids": jax.device_put(_padded_ids(sm.output_token_ids, rows, vocab_size)),
        "banned": jax.device_put(pairs),
    }


def _float32_rows(logits: torch.Tensor) -> jax.Array:
    # Every step works on float32 logits (the contract's first step), so casting before the
    # boundary gives one compilation for all logits dtypes; the cast is exact.
    return to_jax(pad_rows(logits.to(torch.float32), bucket(logits.shape[0])))


def _processed_padded(logits: torch.Tensor, sm: SamplingMetadata) -> jax.Array:
    rows = bucket(logits.shape[0])
    return processed(
        _float32_rows(logits),
        _params(sm, rows, logits.shape[1]),
        all_greedy=sm.all_greedy,
        no_penalties=sm.no_penalties,
        no_top_k=sm.no_top_k,
        no_top_p=sm.no_top_p,
        no_min_p=sm.no_min_p,
    )


def processed_logits(logits: torch.Tensor, sm: SamplingMetadata) -> torch.Tensor:
    return to_torch(_processed_padded(logits, sm))[: logits.shape[0]]


def sample(logits: torch.Tensor, sm: SamplingMetadata) -> SampleOutput:
    b = logits.shape[0]
    rows = bucket(b)
    raw = _float32_rows(logits)
    if sm.all_greedy and sm.no_penalties and sm.banned is None:
        tokens = _argmax(raw)  # nothing to process: the raw argmax is the greedy token
    else:
        draws = sampling_ops.random_draws(sm)
        uniforms = np.zeros(rows, dtype=np.float64)
        random = np.zeros(rows, dtype=bool)
        uniforms[draws.rows] = draws.uniforms.numpy()
        random[draws.rows] = True
        tokens = _draw(_processed_padded(logits, sm), jax.device_put(uniforms), jax.device_put(random))
    token_ids = to_torch(tokens)[:b]
    if sm.max_num_logprobs < 0:
        return SampleOutput(sampled_token_ids=token_ids)
    k = min(sm.max_num_logprobs, logits.shape[1])
    sampled, top_values, top_ids = _logprobs(raw, tokens, k)
    return SampleOutput(
        sampled_token_ids=token_ids,
        sampled_logprobs=to_torch(sampled)[:b],
        top_logprobs=to_torch(top_values)[:b],
        top_token_ids=to_torch(top_ids)[:b],
    )

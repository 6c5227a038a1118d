"""Row-wise kernels in jax.numpy under jax.jit: RMSNorm, rotary embedding, gated activations, linear
(float and weight-only int8).

Each is the CPU reference's formula (xllm/backends/cpu/ops.py) written again in JAX: float32
maths, cast back to the activation dtype at the same points, so results agree with the
reference to float32 rounding. Inputs arrive padded to a row bucket (see `bridge`); padding rows
are zeros, which every kernel here maps to finite values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import xllm_jax.xla_flags  # noqa: F401  (before the first JAX computation)

F32 = jnp.float32
# XLA may lower float32 dots to lower-precision passes on some targets; HIGHEST pins full float32.
_PRECISE = jax.lax.Precision.HIGHEST


def _normalize(hidden: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    h32 = hidden.astype(F32)
    normed = h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    # As HF's LlamaRMSNorm: the normalised value is rounded to the activation dtype before the
    # weight multiplies it, and the product is cast back when the weight is wider.
    return (weight * normed.astype(hidden.dtype)).astype(hidden.dtype)


@functools.partial(jax.jit, static_argnames=("eps",))
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    return _normalize(x, weight, eps)


@functools.partial(jax.jit, static_argnames=("eps",))
def add_rms_norm(
    x: jax.Array, residual: jax.Array, weight: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    # The residual add stays in x's dtype, as Hugging Face's decoder layers do it.
    hidden = x + residual
    return _normalize(hidden, weight, eps), hidden


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, neox_style: bool) -> jax.Array:
    half = cos.shape[-1]
    rot_dim = 2 * half
    rot = x[..., :rot_dim].astype(F32)
    if neox_style:  # pairs (i, i + rot_dim/2)
        x1, x2 = rot[..., :half], rot[..., half:]
        out = jnp.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)
    else:  # GPT-J: adjacent pairs (2i, 2i+1), interleaved back into place
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1).reshape(rot.shape)
    return jnp.concatenate((out.astype(x.dtype), x[..., rot_dim:]), axis=-1)


@functools.partial(jax.jit, static_argnames=("neox_style",))
def rotary_embedding(
    positions: jax.Array, q: jax.Array, k: jax.Array, cos_sin_cache: jax.Array, neox_style: bool
) -> tuple[jax.Array, jax.Array]:
    cos_sin = jnp.take(cos_sin_cache, positions, axis=0).astype(F32)[:, None, :]  # [T, 1, rot]
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    return _rotate(q, cos, sin, neox_style), _rotate(k, cos, sin, neox_style)


@jax.jit
def silu_and_mul(x: jax.Array) -> jax.Array:
    d = x.shape[-1] // 2
    gate, up = x[..., :d].astype(F32), x[..., d:].astype(F32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("approximate",))
def gelu_and_mul(x: jax.Array, approximate: str) -> jax.Array:
    d = x.shape[-1] // 2
    gate, up = x[..., :d].astype(F32), x[..., d:].astype(F32)
    return (jax.nn.gelu(gate, approximate=approximate == "tanh") * up).astype(x.dtype)


def _matmul(x: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
    # float32 accumulation and one rounding of the result, as torch's CPU GEMMs do for half types.
    out = jnp.matmul(x, weight.T, precision=_PRECISE, preferred_element_type=F32)
    if bias is not None:
        out = out + bias.astype(F32)
    return out.astype(x.dtype)


@jax.jit
def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
    return _matmul(x, weight, bias)


@functools.partial(jax.jit, static_argnames=("group_size",))
def linear_int8(
    x: jax.Array, qweight: jax.Array, scales: jax.Array, bias: jax.Array | None, group_size: int
) -> jax.Array:
    # The HAL's dequantisation (`dequantize_int8`): q * scale per group in float32, then rounded
    # to x's dtype, inside the same XLA program as the product.
    out_features, in_features = qweight.shape
    groups = qweight.reshape(out_features, in_features // group_size, group_size).astype(F32)
    weight = (groups * scales[..., None]).reshape(out_features, in_features)
    return _matmul(x, weight.astype(x.dtype), bias)

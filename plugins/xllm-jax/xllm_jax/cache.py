"""The paged KV-cache write: JAX decides what goes where, torch stores it in place.

The KV cache is a torch tensor (the engine allocates it through `Backend.allocate_kv_cache` and
hands the same tensors to every step), and `reshape_and_cache` must update it in place. A JAX
array is immutable and XLA only updates a buffer in place when it owns and is donated it; a
buffer imported through DLPack is not donatable in place (measured on jaxlib's CPU client:
donating a DLPack import makes XLA write a fresh buffer and leaves the torch memory untouched).
So the jitted kernel computes each token's flat destination slot (the slot itself, -1 for a
token to skip), and the store into the torch cache is one ``index_copy_`` of the kept rows of k
and v: a copy of T rows, never of the cache. Writing a whole new cache in JAX and copying it
back would be correct too, at the cost of copying every layer's cache at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch

import xllm_jax.xla_flags  # noqa: F401  (before the first JAX computation)
from xllm_jax.bridge import bucket, pad_rows, to_jax, to_torch


@jax.jit
def _destinations(slot_mapping: jax.Array, num_slots: jax.Array) -> jax.Array:
    slots = slot_mapping.astype(jnp.int64)
    # Negative slots are padding tokens; so are slots past the cache (never given by the engine,
    # dropped rather than clamped onto a real token).
    return jnp.where((slots >= 0) & (slots < num_slots), slots, -1)


def reshape_and_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_blocks, block_size = k_cache.shape[:2]
    t = k.shape[0]
    # `num_slots` is traced, not static: one compilation per token bucket, whatever the cache size.
    dest = to_torch(_destinations(to_jax(pad_rows(slot_mapping, bucket(t), -1)), num_blocks * block_size))[:t]
    keep = dest >= 0
    if not bool(keep.all()):
        dest, k, v = dest[keep], k[keep], v[keep]
    # Slot indexing through a [slots, H, D] view needs the standard layout; a strided cache (never
    # allocated by this backend) goes through (block, offset) indexing instead.
    for cache, rows in ((k_cache, k), (v_cache, v)):
        if cache.is_contiguous():
            cache.view(num_blocks * block_size, *cache.shape[2:]).index_copy_(0, dest, rows)
        else:
            cache[dest // block_size, dest % block_size] = rows

"""The torch <-> JAX boundary: DLPack both ways, 64-bit types, and shape buckets for jax.jit.

Every HAL op enters JAX here and leaves here. Three things make that boundary safe and cheap:

* DLPack. A contiguous CPU torch tensor becomes a JAX array over the same memory (XLA copies only
  when the pointer is misaligned for it); a JAX result becomes a torch tensor over XLA's buffer.
  Results are waited for before they are handed out, so no torch code ever reads a buffer that
  XLA is still writing, and no input is released while XLA still reads it.
* 64-bit types. JAX truncates int64/float64 to 32 bits unless x64 is on, and the HAL's sampling
  contract needs float64 cumulative sums and int64 token ids. x64 is switched on only inside
  this backend's calls (`x64()`), never for the whole process.
* Buckets. jax.jit compiles once per input shape, and the engine's token counts change at every
  step; padding the varying dimension up to a bucket bounds the number of compilations (log2 of
  the largest size) at the price of some padded rows.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import torch

import xllm_jax.xla_flags  # noqa: F401  (before the first JAX computation)

# Up to this size buckets are powers of two; above it, multiples of it (so a 3000-token prefill
# pads to 3072, not 4096).
_POW2_LIMIT = 512


def bucket(n: int) -> int:
    """The padded size jitted kernels see for a dimension of size `n` (n >= 1)."""
    if n <= 1:
        return 1
    if n <= _POW2_LIMIT:
        return 1 << (n - 1).bit_length()
    return -(-n // _POW2_LIMIT) * _POW2_LIMIT


def x64() -> contextlib.AbstractContextManager[None]:
    """64-bit JAX types for the duration of one backend call (jit caches key on this setting)."""
    return jax.enable_x64(True)


def to_jax(t: torch.Tensor) -> jax.Array:
    """A JAX array over the tensor's memory (a contiguous copy first if it is a strided view)."""
    return jax.dlpack.from_dlpack(t.detach().contiguous())


def host_to_jax(values: np.ndarray) -> jax.Array:
    """Host-built metadata (NumPy) as a JAX array on the CPU device."""
    return jax.device_put(values)


def to_torch(a: jax.Array) -> torch.Tensor:
    """A torch tensor over the JAX result's buffer, once XLA has finished writing it."""
    a.block_until_ready()
    return torch.from_dlpack(a)


def pad_rows(t: torch.Tensor, rows: int, value: float | int = 0) -> torch.Tensor:
    """`t` with its first dim padded to `rows` (the same tensor when already that long)."""
    missing = rows - t.shape[0]
    if missing == 0:
        return t
    filler = torch.full((missing, *t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat((t, filler))


def rows_2d(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """`t` as [rows, last] with rows padded to a bucket, and the shape to restore afterwards."""
    flat = t.reshape(-1, t.shape[-1])
    return pad_rows(flat, bucket(flat.shape[0])), tuple(t.shape)


def unrows(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Undoes `rows_2d` on a result with `shape`'s leading dims and its own last dim."""
    rows = int(np.prod(shape[:-1]))
    return t[:rows].reshape(*shape[:-1], t.shape[-1])

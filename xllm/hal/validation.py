"""Argument checks shared by every backend, so a bad call fails the same way everywhere.

Each check raises ValueError naming the op and the argument, before any kernel sees the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{op}: argument '{name}' must have {want} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"{op}: argument '{name}' must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}"
        )
    return t


def check_same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise ValueError(
                f"{op}: argument '{name}' has dtype {str(t.dtype).removeprefix('torch.')}, "
                f"expected {str(ref.dtype).removeprefix('torch.')} like '{ref_name}'"
            )


def check_dim(op: str, name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{op}: argument '{name}' has {what} {actual}, expected {expected}")

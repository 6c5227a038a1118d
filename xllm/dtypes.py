"""The compute dtypes xllm runs in, and every name it accepts for them: the one table.

`EngineConfig.dtype`, the engine's choice of weight dtype, ``config.json``'s ``dtype`` /
``torch_dtype`` (`xllm.models.config.parse_dtype`) and the CLI's ``--dtype`` all read
`DTYPE_ALIASES`, so a name accepted in one place is accepted everywhere and means the same dtype.
This module is a leaf below every layer: it imports nothing from xllm, and torch only when a
`torch.dtype` is asked for, so the CLI can list the names and `EngineConfig` can check them
without paying for ``import torch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Canonical names, in the order users see them; each is also the name of the torch dtype.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")

# Every accepted spelling -> its canonical name (torch's own names, then the short ones that
# vLLM and Hugging Face configs use).
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def canonical_dtype_name(name: str) -> str:
    """'fp16' / 'half' / 'torch.float16' -> 'float16'; ValueError naming the choices otherwise."""
    key = str(name).removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ValueError(
            f"unsupported dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)} "
            f"(or an alias: {', '.join(k for k in DTYPE_ALIASES if k not in DTYPE_NAMES)})"
        )
    return DTYPE_ALIASES[key]


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for an accepted name (a torch.dtype passes through unchecked)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, canonical_dtype_name(name))

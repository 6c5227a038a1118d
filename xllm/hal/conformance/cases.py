"""Conformance cases as data, and the registry of case kinds that build and check them.

A `Case` is an op (or a system check such as graph replay), its parameters, a dtype and a seed,
with a readable name like ``attention(B=3,hq=8,hkv=2,d=64,bs=16,win=None,mixed)[float16]``.
The same list feeds the tests, the ``xllm conformance`` CLI and the JSON report (ggml's
test-backend-ops keeps its cases the same way).

A *case kind* knows how to build its cases and how to check one on a backend against a
reference. Kinds register themselves here by name; `xllm.hal.conformance.ops` registers the eight
HAL ops and `xllm.hal.conformance.system` graph replay and xTensor memory. The whole-model greedy
decode kind lives above the engine (`xllm.conformance.model`, which drives `LLM`) and is
registered with `register_kind("model", ...)` for the duration of an ``xllm conformance`` run.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from xllm.hal.conformance.compare import Checker

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def dtype_name(dtype: torch.dtype | None) -> str:
    return "-" if dtype is None else str(dtype).removeprefix("torch.")


@dataclass(frozen=True, slots=True)
class Case:
    """One check: `op` names its kind; `params` are its shapes and switches, in naming order.

    Parameters whose key starts with ``_`` are data the name leaves out (a list of sequence
    lengths, per-row sampling settings); `label` is a bare word appended to the name (``mixed``,
    ``decode``) that says what they add up to. `small` marks the subset used where time is short
    (interpreted Triton, a quick smoke run).
    """

    op: str
    params: tuple[tuple[str, Any], ...]
    dtype: torch.dtype | None
    seed: int
    small: bool = False
    label: str = ""

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def base_name(self) -> str:
        parts = [f"{k}={_fmt(v)}" for k, v in self.params if not k.startswith("_")]
        if self.label:
            parts.append(self.label)
        return f"{self.op}({','.join(parts)})"

    @property
    def name(self) -> str:
        return f"{self.base_name}[{dtype_name(self.dtype)}]"

    def __str__(self) -> str:
        return self.name


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(_fmt(x) for x in v)
    return str(v)


def make_case(
    op: str,
    dtype: torch.dtype | None,
    *,
    small: bool = False,
    label: str = "",
    **params: Any,
) -> Case:
    """A case whose seed is derived from its dtype-free name, so all dtypes share inputs."""
    case = Case(op=op, params=tuple(params.items()), dtype=dtype, seed=0, small=small, label=label)
    seed = zlib.crc32(case.base_name.encode()) & 0x7FFFFFFF
    return Case(op=op, params=case.params, dtype=dtype, seed=seed, small=small, label=label)


# A check runs one case: it gets the backend under test, the reference (a Backend or a
# NumpyReference) and a `Checker` already holding the case's threshold, and records comparisons
# on the checker. It raises NotSupportedError for what the backend does not do.
CheckFn = Callable[["Case", Any, Any, "Checker"], None]


@dataclass(frozen=True, slots=True)
class CaseKind:
    name: str
    build: Callable[[], list[Case]]
    check: CheckFn
    # False for checks of the backend against itself (graph replay vs eager, xTensor semantics).
    uses_reference: bool = True
    description: str = field(default="")


_KINDS: dict[str, CaseKind] = {}


def register_kind(
    name: str,
    build: Callable[[], list[Case]],
    check: CheckFn,
    *,
    uses_reference: bool = True,
    description: str = "",
) -> CaseKind:
    kind = CaseKind(name, build, check, uses_reference, description)
    _KINDS[name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Removes a kind registered from outside this package (the engine's "model" kind is scoped
    to the run that registered it, so it does not leak into other users in the process)."""
    _KINDS.pop(name, None)


def get_kind(name: str) -> CaseKind:
    _ensure_builtin_kinds()
    if name not in _KINDS:
        raise KeyError(f"no conformance case kind {name!r}; known: {', '.join(_KINDS)}")
    return _KINDS[name]


def kinds() -> dict[str, CaseKind]:
    _ensure_builtin_kinds()
    return dict(_KINDS)


def build_cases(size: str = "all", filters: list[str] | None = None) -> list[Case]:
    """Every registered kind's cases; ``size="small"`` keeps the small ones; `filters` keeps
    cases whose op equals, or whose name contains, any of the given strings."""
    if size not in ("small", "all"):
        raise ValueError(f"size must be 'small' or 'all', got {size!r}")
    cases = [c for kind in kinds().values() for c in kind.build()]
    if size == "small":
        cases = [c for c in cases if c.small]
    if filters:
        cases = [c for c in cases if any(f == c.op or f in c.name for f in filters)]
    return cases


def _ensure_builtin_kinds() -> None:
    # Imported lazily: the kind modules import this one to register themselves.
    import xllm.hal.conformance.comm  # noqa: F401
    import xllm.hal.conformance.ops  # noqa: F401
    import xllm.hal.conformance.quant  # noqa: F401
    import xllm.hal.conformance.system  # noqa: F401
    import xllm.hal.conformance.transfer  # noqa: F401

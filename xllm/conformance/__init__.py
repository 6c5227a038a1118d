"""Conformance kinds that need the layers above the HAL: today the whole-model greedy decode.

Why here: the case registry, the runner and the op and system kinds live in
`xllm.hal.conformance`, and the HAL must not import the engine or the models (they sit above it,
and every backend imports the HAL). The "model" kind (`xllm.conformance.model`) decodes through
`LLM`, so it lives in this package, above the engine (``xllm.conformance -> engine -> models ->
hal``), and plugs into the HAL's registry through `register_kind`, the door any kind from outside
the HAL uses. It does so only inside `kinds_registered()`, the scope ``xllm conformance`` runs
in: importing this package changes nothing for other users of the registry. The engine takes
the backend under test as an instance (`LLM(backend=...)`), so the decode runs on that very
object, options and all.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from xllm.conformance.model import model_kind_registered


@contextmanager
def kinds_registered() -> Iterator[None]:
    """Registers every kind defined above the HAL for the duration (``xllm conformance`` wraps
    its run in this, so ``--filter``/``--size``/``--list`` see them like the HAL's own)."""
    with model_kind_registered():
        yield


__all__ = ["kinds_registered", "model_kind_registered"]

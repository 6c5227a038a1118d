"""Finds backends: the built-in ones plus any installed under the ``xllm.backends`` entry-point group.

Entries are ``name -> "module:Class"`` strings resolved lazily (tinygrad and vLLM do the same), so
listing backends imports only their small backend modules, and a broken or unavailable one is
reported with its reason instead of breaking `import xllm`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib.metadata import entry_points

from xllm.hal.backend import Backend, Capabilities
from xllm.hal.errors import BackendUnavailableError, UnknownBackendError

ENTRY_POINT_GROUP = "xllm.backends"
ENV_VAR = "XLLM_BACKEND"

BUILTIN_BACKENDS: dict[str, str] = {
    "cpu": "xllm.backends.cpu.backend:CpuBackend",
    "cuda": "xllm.backends.cuda.backend:CudaBackend",
    "ascend": "xllm.backends.ascend.backend:AscendBackend",
}

# `get_backend()` without a name takes the first available of these, accelerators first.
DEFAULT_PREFERENCE: tuple[str, ...] = ("cuda", "ascend", "cpu")

_extra: dict[str, str | type[Backend]] = {}
_instances: dict[tuple[str, tuple[tuple[str, object], ...]], Backend] = {}


def register_backend(name: str, target: str | type[Backend]) -> None:
    """Registers a backend by ``"module:Class"`` path or class (tests and plugins use this)."""
    _extra[name] = target
    for key in [k for k in _instances if k[0] == name]:
        del _instances[key]


def unregister_backend(name: str) -> None:
    _extra.pop(name, None)
    for key in [k for k in _instances if k[0] == name]:
        del _instances[key]


def _entry_point_backends() -> dict[str, str]:
    try:
        return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # a broken distribution's metadata must not hide the built-in backends
        return {}


def registered_backends() -> dict[str, str | type[Backend]]:
    found: dict[str, str | type[Backend]] = dict(BUILTIN_BACKENDS)
    found.update(_entry_point_backends())
    found.update(_extra)
    return found


def known_backend_names() -> list[str]:
    return list(registered_backends())


def load_backend_class(name: str) -> type[Backend]:
    """Imports the class registered as `name`; raises UnknownBackendError or BackendUnavailableError."""
    targets = registered_backends()
    if name not in targets:
        raise UnknownBackendError(name, list(targets))
    target = targets[name]
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # report, don't crash: an optional backend may fail to import
        raise BackendUnavailableError(name, f"cannot import {target}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendUnavailableError(name, f"{target} is not a xllm.hal.Backend subclass")
    return cls


def get_backend(name: str | None = None, **options: object) -> Backend:
    """The backend instance for `name`, else ``$XLLM_BACKEND``, else the first available one.

    `options` go to the chosen backend's probe and constructor however it was chosen (when
    auto-selecting, a candidate whose probe rejects them is skipped like an unavailable one).
    Instances are cached per name and options, so every layer of one process shares one backend.
    """
    if name is None:
        name = os.environ.get(ENV_VAR) or None
    if name is None:
        reasons = []
        for candidate in DEFAULT_PREFERENCE:
            try:
                return get_backend(candidate, **options)
            except BackendUnavailableError as exc:
                reasons.append(f"{candidate}: {exc.reason}")
        raise BackendUnavailableError("auto", "no backend is available (" + "; ".join(reasons) + ")")
    key = (name, tuple(sorted(options.items())))
    if key in _instances:
        return _instances[key]
    cls = load_backend_class(name)
    reason = cls.probe(**options)
    if reason is not None:
        raise BackendUnavailableError(name, reason)
    instance = cls(**options)
    _instances[key] = instance
    return instance


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    available: bool
    reason: str | None
    device_count: int
    capabilities: Capabilities | None

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "available": self.available,
            "reason": self.reason,
            "device_count": self.device_count,
            "capabilities": self.capabilities.as_dict() if self.capabilities else None,
        }


def list_backends() -> list[BackendInfo]:
    """One entry per registered backend, probing each without constructing it."""
    infos = []
    for name in registered_backends():
        try:
            cls = load_backend_class(name)
        except BackendUnavailableError as exc:
            infos.append(BackendInfo(name, False, exc.reason, 0, None))
            continue
        try:
            reason = cls.probe()
            count = cls.device_count() if reason is None else 0
        except Exception as exc:  # probes must not raise; if one does, say so instead of crashing
            reason, count = f"probe failed: {type(exc).__name__}: {exc}", 0
        infos.append(BackendInfo(name, reason is None, reason, count, cls.CAPABILITIES))
    return infos

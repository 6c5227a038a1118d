"""Exceptions raised at the HAL boundary, so callers can tell a missing backend from a bad call."""

from __future__ import annotations


class HALError(Exception):
    """Base class of every error the HAL raises on purpose."""


class UnknownBackendError(HALError, KeyError):
    """Asked for a backend name nobody registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown backend {name!r}; known backends: {', '.join(known) or '(none)'}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class BackendUnavailableError(HALError, RuntimeError):
    """The backend is registered but cannot run here; `reason` says why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"backend {name!r} is unavailable: {reason}")


class UnmappedMemoryError(HALError, RuntimeError):
    """A view or access touched xTensor pages that are not mapped to physical memory."""


class NotSupportedError(HALError, NotImplementedError):
    """The backend does not support this operation or dtype (conformance reports it as such)."""


class DeviceFaultError(HALError, RuntimeError):
    """The accelerator failed in a way this process cannot recover from (a lost device, an
    uncorrectable memory error, a sticky kernel fault that poisons the device context).

    A backend raises it, or wraps a runtime error in it, when it knows the device is gone;
    `Backend.is_fatal_error` is true for it (anywhere in an exception's cause chain), and the
    engine then stops at once instead of failing only the step's requests.
    """

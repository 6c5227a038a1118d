"""Streams and events: the HAL's handle on asynchronous device work.

On the CPU reference they are synchronous objects with the same interface, so engine code that
overlaps work on a GPU runs unchanged (and trivially correct) on the CPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Stream(ABC):
    @abstractmethod
    def synchronize(self) -> None:
        """Blocks until all work queued on this stream is done."""

    @abstractmethod
    def wait_event(self, event: Event) -> None:
        """Makes later work on this stream wait for `event`."""

    @abstractmethod
    def __enter__(self) -> Stream:
        """Makes this the current stream inside the `with` block."""

    @abstractmethod
    def __exit__(self, *exc: object) -> None: ...


class Event(ABC):
    @abstractmethod
    def record(self, stream: Stream | None = None) -> None:
        """Marks the point reached by `stream` (the current stream when None)."""

    @abstractmethod
    def synchronize(self) -> None:
        """Blocks until the recorded work is done."""

    @abstractmethod
    def query(self) -> bool:
        """True once the recorded work is done."""

    @abstractmethod
    def elapsed_time_ms(self, end: Event) -> float:
        """Milliseconds between this event and `end` (both recorded, timing enabled)."""

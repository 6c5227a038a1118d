"""Streams and events: the HAL's handle on asynchronous device work.

`SyncStream` and `SyncEvent` are the synchronous pair for backends whose work has finished when a
call returns (the CPU reference, the CUDA backend's interpreter mode): same interface, so engine
code that overlaps work on a GPU runs unchanged (and trivially correct) there.
"""

from __future__ import annotations

import threading
import time
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


class SyncStream(Stream):
    """A stream over synchronous work: nothing to wait for. Given a backend's per-thread stack,
    entering it makes it that thread's current stream until the `with` block ends."""

    def __init__(self, stack: threading.local | None = None) -> None:
        self._stack = stack

    def synchronize(self) -> None:
        pass  # work issued here is already done

    def wait_event(self, event: Event) -> None:
        pass  # every recorded event is already complete

    def __enter__(self) -> SyncStream:
        if self._stack is not None:
            self._stack.__dict__.setdefault("streams", []).append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.streams.pop()


class SyncEvent(Event):
    """Recording takes a host timestamp; everything recorded is already done."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.enable_timing = enable_timing
        self._time_s: float | None = None

    def record(self, stream: Stream | None = None) -> None:
        self._time_s = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time_ms(self, end: Event) -> float:
        if not (isinstance(end, SyncEvent) and self.enable_timing and end.enable_timing):
            raise RuntimeError("elapsed_time_ms needs two synchronous events created with enable_timing=True")
        if self._time_s is None or end._time_s is None:
            raise RuntimeError("both events must be recorded before elapsed_time_ms")
        return (end._time_s - self._time_s) * 1000.0


class SyncStreams:
    """The stream bookkeeping of a backend whose ops finish before they return (the CPU
    reference, host-memory ports): a per-thread stack of entered streams and a default stream
    for a thread that entered none. The backend's `create_stream` and `current_stream` are
    `create()` and `current()`."""

    def __init__(self) -> None:
        self._stack = threading.local()
        self.default = SyncStream(self._stack)

    def create(self) -> SyncStream:
        return SyncStream(self._stack)

    def current(self) -> Stream:
        streams = getattr(self._stack, "streams", None)
        return streams[-1] if streams else self.default

"""Synchronous streams and events for the CPU backend.

CPU work runs when it is issued, so a stream has nothing to wait for and an event is complete as
soon as it is recorded. They still honour the HAL interface (current-stream context, timing), so
engine code written for overlapped GPU work runs unchanged here.
"""

from __future__ import annotations

import threading
import time

from xllm.hal.streams import Event, Stream


class CpuStream(Stream):
    def __init__(self, stack: threading.local) -> None:
        self._stack = stack  # per-thread stack of entered streams, owned by the backend

    def synchronize(self) -> None:
        pass  # work issued on the CPU is already done

    def wait_event(self, event: Event) -> None:
        pass  # every recorded event is already complete

    def __enter__(self) -> CpuStream:
        self._stack.__dict__.setdefault("streams", []).append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.streams.pop()


class CpuEvent(Event):
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
        if not (isinstance(end, CpuEvent) and self.enable_timing and end.enable_timing):
            raise RuntimeError("elapsed_time_ms needs two CPU events created with enable_timing=True")
        if self._time_s is None or end._time_s is None:
            raise RuntimeError("both events must be recorded before elapsed_time_ms")
        return (end._time_s - self._time_s) * 1000.0

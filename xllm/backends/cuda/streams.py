"""Streams and events of the CUDA backend: thin wrappers over torch.cuda's, plus synchronous
stand-ins for interpret mode, where kernels run on the host and every call has finished on return."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any

import torch

from xllm.hal import Event, Stream


class CudaStream(Stream):
    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream
        self._ctx: list[AbstractContextManager[Any]] = []  # nested `with` blocks on one stream

    def synchronize(self) -> None:
        self.stream.synchronize()

    def wait_event(self, event: Event) -> None:
        if not isinstance(event, CudaEvent):
            raise TypeError(f"CudaStream.wait_event needs a CudaEvent, got {type(event).__name__}")
        self.stream.wait_event(event.event)

    def __enter__(self) -> CudaStream:
        ctx = torch.cuda.stream(self.stream)
        ctx.__enter__()
        self._ctx.append(ctx)
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.pop().__exit__(*exc)


class CudaEvent(Event):
    def __init__(self, enable_timing: bool = False) -> None:
        self.event = torch.cuda.Event(enable_timing=enable_timing)

    def record(self, stream: Stream | None = None) -> None:
        if stream is None:
            self.event.record()
        elif isinstance(stream, CudaStream):
            self.event.record(stream.stream)
        else:
            raise TypeError(f"CudaEvent.record needs a CudaStream, got {type(stream).__name__}")

    def synchronize(self) -> None:
        self.event.synchronize()

    def query(self) -> bool:
        return bool(self.event.query())

    def elapsed_time_ms(self, end: Event) -> float:
        if not isinstance(end, CudaEvent):
            raise TypeError(f"elapsed_time_ms needs a CudaEvent, got {type(end).__name__}")
        return float(self.event.elapsed_time(end.event))


class HostStream(Stream):
    """Interpret mode: work is synchronous, so a stream only has to exist."""

    def synchronize(self) -> None:
        pass

    def wait_event(self, event: Event) -> None:
        pass

    def __enter__(self) -> HostStream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class HostEvent(Event):
    """Interpret mode: recording takes a host timestamp; everything recorded is already done."""

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
        if not isinstance(end, HostEvent) or self._time_s is None or end._time_s is None:
            raise RuntimeError("elapsed_time_ms needs two recorded events")
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("elapsed_time_ms needs events created with enable_timing=True")
        return (end._time_s - self._time_s) * 1000.0

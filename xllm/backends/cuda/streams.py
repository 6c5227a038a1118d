"""Streams and events of the CUDA backend: thin wrappers over torch.cuda's. Interpret mode, where
kernels run on the host and every call has finished on return, uses the HAL's `SyncStream` and
`SyncEvent` instead."""

from __future__ import annotations

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

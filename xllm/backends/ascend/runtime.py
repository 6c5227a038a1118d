"""NPU streams, events, ACL graphs and the HCCL communicator for the Ascend backend.

torch_npu mirrors torch.cuda under ``torch.npu`` once imported: ``torch.npu.Stream`` / ``Event``
/ ``stream(...)``, ``torch.npu.NPUGraph`` with ``torch.npu.graph(g, pool=...)`` and
``torch.npu.graph_pool_handle()``, and the ``hccl`` torch.distributed backend. Each class takes
the ``torch.npu`` namespace as an argument, so nothing here imports torch_npu by itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from xllm.hal.comm import Communicator
from xllm.hal.graphs import GraphInput, GraphRunner
from xllm.hal.streams import Event, Stream


class NpuStream(Stream):
    def __init__(self, npu_ns: Any, stream: Any) -> None:
        self._ns = npu_ns
        self.raw = stream  # the torch.npu.Stream, for code that needs it
        self._ctx: Any = None

    def synchronize(self) -> None:
        self.raw.synchronize()

    def wait_event(self, event: Event) -> None:
        if not isinstance(event, NpuEvent):
            raise TypeError(f"an NPU stream can only wait on an NPU event, got {type(event).__name__}")
        self.raw.wait_event(event.raw)

    def __enter__(self) -> NpuStream:
        self._ctx = self._ns.stream(self.raw)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        ctx, self._ctx = self._ctx, None
        ctx.__exit__(*exc)


class NpuEvent(Event):
    def __init__(self, npu_ns: Any, enable_timing: bool) -> None:
        self._ns = npu_ns
        self.raw = npu_ns.Event(enable_timing=enable_timing)

    def record(self, stream: Stream | None = None) -> None:
        if stream is None:
            self.raw.record()
        elif isinstance(stream, NpuStream):
            self.raw.record(stream.raw)
        else:
            raise TypeError(f"an NPU event can only record an NPU stream, got {type(stream).__name__}")

    def synchronize(self) -> None:
        self.raw.synchronize()

    def query(self) -> bool:
        return bool(self.raw.query())

    def elapsed_time_ms(self, end: Event) -> float:
        if not isinstance(end, NpuEvent):
            raise TypeError(f"elapsed_time_ms needs an NPU event, got {type(end).__name__}")
        return float(self.raw.elapsed_time(end.raw))


class NpuGraphRunner(GraphRunner):
    """Buckets captured as ACL graphs (`torch.npu.NPUGraph`) sharing one memory pool.

    `capture_scope` is the backend's context manager that switches attention to its
    capture-safe path while a graph is recorded (see `AscendBackend._attention`).
    """

    def __init__(
        self,
        npu_ns: Any,
        capture_scope: Callable[[], Any],
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        device: torch.device,
        capture_sizes: Sequence[int] | None,
        max_batch_size: int | None,
    ) -> None:
        super().__init__(fn, inputs, device, capture_sizes, max_batch_size)
        self._ns = npu_ns
        self._capture_scope = capture_scope
        self._graphs: dict[int, Any] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool: Any = None  # shared across buckets; capture() goes largest first

    def _capture(self, size: int, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        ns = self._ns
        # Warm up on a side stream first, as with CUDA graphs: lazy initialisation (workspaces,
        # operator caches) must not happen inside the capture.
        side = ns.Stream(device=self.device)
        side.wait_stream(ns.current_stream(self.device))
        with self._capture_scope(), ns.stream(side):
            fn(**inputs)
        ns.current_stream(self.device).wait_stream(side)
        ns.synchronize(self.device)
        if self._pool is None:
            self._pool = ns.graph_pool_handle()
        graph = ns.NPUGraph()
        with self._capture_scope(), ns.graph(graph, pool=self._pool):
            out = fn(**inputs)
        self._graphs[size] = graph
        self._outputs[size] = out

    def _replay(self, size: int) -> torch.Tensor:
        self._graphs[size].replay()
        return self._outputs[size]


class HcclCommunicator(Communicator):
    """One rank of a torch.distributed process group on the ``hccl`` backend."""

    def __init__(
        self, rank: int, world_size: int, init_method: str, device: torch.device, backend: str = "hccl"
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend, init_method=init_method, rank=rank, world_size=world_size
            )
            self._owns_default_group = True
        else:
            self._owns_default_group = False
        # A dedicated group, so an engine that already uses the default group is not disturbed.
        self.group = dist.new_group(ranks=list(range(world_size)), backend=backend)
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("communicator is closed")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check()
        out = torch.empty(
            (self.world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
        )
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=self.group)
        return out

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._check()
        dist.send(tensor.contiguous(), dst=dst, group=self.group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._check()
        dist.recv(tensor, src=src, group=self.group)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check()
        if tensor.is_contiguous():
            dist.broadcast(tensor, src=src, group=self.group)
        else:
            buf = tensor.contiguous()
            dist.broadcast(buf, src=src, group=self.group)
            tensor.copy_(buf)
        return tensor

    def barrier(self) -> None:
        self._check()
        dist.barrier(group=self.group)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        dist.destroy_process_group(self.group)
        if self._owns_default_group:
            dist.destroy_process_group()


@contextmanager
def flag_scope(holder: Any, attr: str) -> Iterator[None]:
    """Sets ``holder.attr`` to True for the duration of the block (re-entrant)."""
    previous = getattr(holder, attr)
    setattr(holder, attr, True)
    try:
        yield
    finally:
        setattr(holder, attr, previous)


def npu_namespace(npu_module: ModuleType) -> Any:
    """``torch.npu``, which torch_npu registers on import (None for a test stand-in on the CPU)."""
    del npu_module  # taking it proves the import happened first
    return getattr(torch, "npu", None)

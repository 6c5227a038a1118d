"""`NpuGraphRunner`'s capture protocol, driven through a recording stand-in for ``torch.npu``:
warm-up on a side stream then capture, largest bucket first, one shared memory pool, and the
backend's capture flag set throughout (so attention and cache writes take capture-safe paths).
Real ACL graph replay is checked in test_npu.py."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tests.backends.ascend.documented_npu import DocumentedNpu
from xllm.backends.ascend.backend import AscendBackend
from xllm.backends.ascend.runtime import NpuGraphRunner, flag_scope
from xllm.hal import GraphInput


class RecordingNs:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    class _Stream:
        def __init__(self, ns, name):
            self.ns, self.name = ns, name

        def wait_stream(self, other):
            self.ns.events.append(("wait", self.name, other.name))

    def Stream(self, device=None):  # noqa: N802 - mirrors torch.npu.Stream
        return self._Stream(self, "side")

    def current_stream(self, device=None):
        return self._Stream(self, "current")

    @contextmanager
    def stream(self, s):
        self.events.append(("enter_stream", s.name))
        yield
        self.events.append(("exit_stream", s.name))

    def synchronize(self, device=None):
        self.events.append(("sync",))

    def graph_pool_handle(self):
        self.events.append(("pool",))
        return "pool-0"

    class _Graph:
        def __init__(self, ns):
            self.ns = ns

        def replay(self):
            self.ns.events.append(("replay", self.size))

    def NPUGraph(self):  # noqa: N802 - mirrors torch.npu.NPUGraph
        return self._Graph(self)

    @contextmanager
    def graph(self, g, pool=None):
        self.events.append(("capture", pool))
        yield
        self.events.append(("end_capture",))


def test_capture_protocol_and_flag():
    ns = RecordingNs()
    backend = AscendBackend(npu_module=DocumentedNpu())
    seen: list[tuple[int, bool]] = []

    def fn(x):
        seen.append((x.shape[0], backend._capturing))
        return x * 2

    runner = NpuGraphRunner(
        ns,
        lambda: flag_scope(backend, "_capturing"),
        fn,
        {"x": GraphInput(torch.float32, (3,))},
        torch.device("cpu"),
        [1, 2, 4],
        None,
    )
    runner.capture()
    # Every bucket: a warm-up run and a captured run, both with the capture flag; largest first.
    assert seen == [(4, True), (4, True), (2, True), (2, True), (1, True), (1, True)]
    assert backend._capturing is False
    assert [e for e in ns.events if e[0] == "pool"] == [("pool",)]  # one pool shared by all buckets
    assert [e for e in ns.events if e[0] == "capture"] == [("capture", "pool-0")] * 3
    first = ns.events[: ns.events.index(("capture", "pool-0"))]
    assert first[:3] == [("wait", "side", "current"), ("enter_stream", "side"), ("exit_stream", "side")]
    for g in runner._graphs.values():
        g.size = None
    runner._graphs[4].size = 4
    out = runner.run(x=torch.ones(3, 3))
    assert ns.events[-1] == ("replay", 4)
    assert out.shape == (3, 3)  # the first b rows of the bucket's static output


def test_flag_scope_restores_on_error():
    class Holder:
        flag = False

    h = Holder()
    try:
        with flag_scope(h, "flag"):
            assert h.flag
            raise RuntimeError
    except RuntimeError:
        pass
    assert h.flag is False

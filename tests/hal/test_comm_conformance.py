"""The ``comm`` conformance kind: the CPU backend's gloo communicator passes all-reduce,
all-gather and broadcast in a real two-process group, and the ABC's broadcast fallback (sends
from the source) means the same thing as the library broadcast."""

from __future__ import annotations

import torch

from xllm.hal import get_backend
from xllm.hal.comm import Communicator
from xllm.hal.conformance.cases import build_cases
from xllm.hal.conformance.numpy_ref import NumpyReference
from xllm.hal.conformance.runner import run_suite


def test_cpu_comm_cases_pass() -> None:
    cases = build_cases("all", filters=["comm"])
    assert {c.label for c in cases} == {"all_reduce", "all_gather", "broadcast"}
    report = run_suite(get_backend("cpu"), NumpyReference(), cases)
    assert report.ok, [(r.name, r.detail) for r in report.failed()]
    assert len(report.results) == len(cases)


class _Loopback(Communicator):
    """Rank `rank` of a world whose sends land in a shared mailbox (enough for the fallback)."""

    def __init__(self, rank: int, world_size: int, mailbox: dict[int, torch.Tensor]) -> None:
        self.rank, self.world_size, self.mailbox = rank, world_size, mailbox

    def all_reduce(self, tensor):  # pragma: no cover - not used
        raise NotImplementedError

    def all_gather(self, tensor):  # pragma: no cover - not used
        raise NotImplementedError

    def send(self, tensor, dst):
        self.mailbox[dst] = tensor.clone()

    def recv(self, tensor, src):
        return tensor.copy_(self.mailbox[self.rank])

    def barrier(self):
        pass

    def close(self):
        pass


def test_broadcast_fallback_sends_from_the_source() -> None:
    mailbox: dict[int, torch.Tensor] = {}
    src = torch.arange(6.0).view(2, 3)
    assert _Loopback(1, 3, mailbox).broadcast(src, src=1) is src
    for rank in (0, 2):
        out = torch.zeros(2, 3)
        assert _Loopback(rank, 3, mailbox).broadcast(out, src=1) is out
        assert torch.equal(out, src)

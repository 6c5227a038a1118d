"""Case kind ``comm``: the backend's `Communicator` collectives against their definition.

A communicator is one process's membership of a group, so the cases run in a group of
``world_size`` spawned processes, each opening the backend under test (by registry name, or a
backend built in code by its class) and calling ``create_communicator``; the group is started once per backend and reused by every case of a run
(starting processes costs seconds, a collective milliseconds). Each case hands every rank an
input drawn from the case's seed, runs one collective and brings every rank's result back:

* ``all_reduce``: every rank holds the sum of the inputs (compared with the float64 sum, within the
  dtype's tolerance: the backend may add in another order);
* ``all_gather``: every rank holds the inputs concatenated in rank order (bit-exact);
* ``broadcast``: every rank holds rank ``src``'s input (bit-exact), for ``src`` 0 and the last rank,
  with a non-contiguous destination on the receivers.

The reference is the collective's definition computed on the host, so the kind needs no reference
backend. A backend with its own memory and fewer devices than ranks reports the cases as not
supported (two ranks on one accelerator is not a layout any collective library promises).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import socket
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from xllm.hal.conformance.cases import DTYPES, Case, make_case, register_kind
from xllm.hal.conformance.compare import Checker
from xllm.hal.conformance.inputs import generator, randn
from xllm.hal.errors import NotSupportedError

WORLD_SIZE = 2
_START_TIMEOUT_S = 120.0
_CASE_TIMEOUT_S = 60.0


def _build() -> list[Case]:
    cases = []
    small = True  # once the group is up a collective costs milliseconds: every run gets them all
    for dtype in DTYPES:
        cases.append(make_case("comm", dtype, small=small, label="all_reduce", shape=(5, 33)))
        cases.append(make_case("comm", dtype, small=small, label="all_gather", shape=(3, 7, 4)))
        for src in (0, WORLD_SIZE - 1):
            cases.append(make_case("comm", dtype, small=small, label="broadcast", shape=(4, 9), src=src))
    return cases


# ---------------------------------------------------------------------------------- the group


def _rank_main(opener: str | type, rank: int, init_method: str, conn: Connection) -> None:
    """A rank of the group: runs each collective it is sent, answers with the result on the host."""
    try:
        from xllm.hal import get_backend

        backend = get_backend(opener) if isinstance(opener, str) else opener()
        comm = backend.create_communicator(rank, WORLD_SIZE, init_method)
        device = backend.device(rank)
    except BaseException as exc:
        conn.send(("error", f"rank {rank} could not join: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    try:
        while True:
            try:
                op, tensor, src = conn.recv()
            except (EOFError, OSError):
                return
            try:
                # A copy: torch sends CPU tensors through a pipe in shared memory, and an in-place
                # collective would otherwise write into the caller's inputs.
                x = tensor.to(device, copy=True)
                if op == "all_reduce":
                    out = comm.all_reduce(x)
                elif op == "all_gather":
                    out = comm.all_gather(x)
                else:
                    # A strided destination on the receivers: the result must land in it as given.
                    if rank != src:
                        x = torch.empty(tuple(reversed(x.shape)), dtype=x.dtype, device=device).t()
                        x.fill_(-1)
                    out = comm.broadcast(x, src)
                    if out is not x:
                        raise AssertionError("broadcast must return the tensor it was given")
                conn.send(("ok", out.to("cpu")))
            except Exception:
                conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
    finally:
        comm.close()


class _Group:
    def __init__(self, opener: str | type) -> None:
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for rank in range(WORLD_SIZE):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, args=(opener, rank, init_method, child), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self.replies(_START_TIMEOUT_S)

    def replies(self, timeout: float) -> list[Any]:
        """Every rank's answer, in rank order; raises RuntimeError (and stops the group) on an
        error, a dead rank or a timeout, so no case can hang a run."""
        got: dict[int, Any] = {}
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        conns = {c: r for r, c in enumerate(self.conns)}
        while len(got) < WORLD_SIZE:
            ready = wait([c for c, r in conns.items() if r not in got] + list(sentinels), timeout)
            if not ready:
                self.close()
                raise RuntimeError(f"communicator ranks did not answer within {timeout:g} s")
            for obj in ready:
                if obj in conns:
                    status, value = obj.recv()
                    if status == "error":
                        self.close()
                        raise RuntimeError(value)
                    got[conns[obj]] = value
                elif sentinels[obj] not in got:
                    self.close()
                    raise RuntimeError(f"communicator rank {sentinels[obj]} died")
        return [got[r] for r in range(WORLD_SIZE)]

    def run(self, op: str, inputs: list[torch.Tensor], src: int) -> list[torch.Tensor]:
        for conn, x in zip(self.conns, inputs, strict=True):
            conn.send((op, x, src))
        return self.replies(_CASE_TIMEOUT_S)

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()  # a rank whose pipe closes leaves the group and exits
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


_GROUPS: dict[str, _Group] = {}


def _opener(backend: Any) -> str | type:
    """How a rank opens the backend: by registry name, else (a backend built in code, such as a
    test double) by constructing its class with no arguments, imported in the child."""
    from xllm.hal.registry import get_backend

    try:
        registered = type(get_backend(backend.name)) is type(backend)
    except Exception:
        registered = False
    return backend.name if registered else type(backend)


def _group(backend: Any) -> _Group:
    opener = _opener(backend)
    key = opener if isinstance(opener, str) else f"{opener.__module__}.{opener.__qualname__}"
    group = _GROUPS.get(key)
    if group is None or not group.alive:
        try:
            group = _GROUPS[key] = _Group(opener)
        except RuntimeError as exc:
            raise NotSupportedError(f"the comm cases could not start {WORLD_SIZE} ranks: {exc}") from None
    return group


@atexit.register
def _close_groups() -> None:
    while _GROUPS:
        _GROUPS.popitem()[1].close()


# ---------------------------------------------------------------------------------- the check


def _check(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    del reference  # the collectives' definitions are the reference
    if not backend.capabilities.shares_host_memory and type(backend).device_count() < WORLD_SIZE:
        raise NotSupportedError(f"the comm cases need {WORLD_SIZE} devices, one per rank")
    p, op = case.p, case.label
    gen = generator(case.seed)
    inputs = [randn(gen, tuple(p["shape"]), case.dtype) for _ in range(WORLD_SIZE)]
    src = p.get("src", 0)
    outputs = _group(backend).run(op, inputs, src)
    for rank, out in enumerate(outputs):
        if op == "all_reduce":
            expected = torch.stack([x.to(torch.float64) for x in inputs]).sum(0)
            chk.close(f"rank {rank} all_reduce", out, expected)
            if out.dtype != case.dtype:
                chk.fail(f"rank {rank} all_reduce: dtype {out.dtype} != {case.dtype}")
        elif op == "all_gather":
            chk.exact(f"rank {rank} all_gather", out, torch.cat(inputs, dim=0))
        else:
            chk.exact(f"rank {rank} broadcast from {src}", out, inputs[src])


register_kind(
    "comm",
    _build,
    _check,
    uses_reference=False,
    description="Communicator all_reduce / all_gather / broadcast in a group of 2 processes",
)

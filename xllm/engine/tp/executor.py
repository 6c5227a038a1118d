"""`TensorParallelExecutor`: the driver side of tensor parallelism.

The engine keeps its one scheduler, KV block manager and request bookkeeping in the driver
process; this object stands in for both its model (``config``, ``dtype``) and its `ModelRunner`
(``execute``). It spawns one worker per rank (`worker.worker_main`), sends every rank the same
step (the host lists of `prepare_inputs`, small enough for the pipe) and returns rank 0's
`StepResult`. Ranks run the same step on the same inputs, so they issue the same collectives in
the same order; the driver is not a member of their communicator.

Failure handling, so that nothing hangs: every wait is on the pipes *and* the process sentinels,
so a worker that dies (killed, crashed) is seen at once and raises `WorkerDiedError` naming the
rank. It is a `DeviceFaultError`, which the engine treats as fatal: it fails every request and
stops with `EngineDeadError`. The surviving workers are killed (they may be blocked in a
collective with the dead one). A step that raises on some ranks but not all leaves the ranks out
of step with each other, so it is fatal too; one that raises on every rank is the step's own
failure, as on one device.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import socket
import sys
import time
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

from xllm.engine.config import EngineConfig
from xllm.engine.kv_cache_sizing import KVCachePlan
from xllm.engine.model_runner import StepResult, prepare_inputs
from xllm.engine.scheduler import ScheduledSequence
from xllm.engine.tp.messages import WorkerSpec, view_step
from xllm.engine.tp.worker import worker_main
from xllm.hal import Backend
from xllm.hal.errors import DeviceFaultError
from xllm.models.config import ModelConfig
from xllm.models.parallel import check_shardable

logger = logging.getLogger("xllm.engine.tp")

START_TIMEOUT_S = 600.0  # spawn, import torch, read the shard: minutes for a large checkpoint
_SHUTDOWN_TIMEOUT_S = 5.0
_ERROR_GRACE_S = 5.0  # after one rank's error, how long the others get to report theirs


class WorkerDiedError(DeviceFaultError):
    """A tensor-parallel worker process exited, or its ranks fell out of step: the engine's
    model is gone."""


class WorkerStepError(RuntimeError):
    """Every rank raised in the same step (the step's own failure, as on one device)."""


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Spawn re-runs the parent's ``__main__`` in the child unless it cannot find it. A worker
    needs nothing from the caller's script, and a script without an ``if __name__ ==
    "__main__"`` guard would otherwise build an engine again inside every worker."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads_per_rank(world_size: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // world_size)


class TensorParallelExecutor:
    def __init__(self, config: EngineConfig, backend: Backend, model_path: str, dtype: torch.dtype) -> None:
        world = config.tensor_parallel_size
        if config.backend is not None and not isinstance(config.backend, str):
            raise ValueError(
                "tensor_parallel_size > 1 opens the backend by name in every worker; pass backend "
                "as a name (see `xllm backends`), not a Backend instance"
            )
        self.config = ModelConfig.from_pretrained(model_path)
        check_shardable(self.config, world)  # before spawning anything
        visible = type(backend).device_count()
        if not backend.capabilities.shares_host_memory and visible < world:
            raise ValueError(
                f"tensor_parallel_size {world} needs {world} {backend.name} devices, one per rank; "
                f"{visible} visible"
            )
        self.dtype = dtype
        self.world_size = world
        self._block_size = config.block_size
        ctx = mp.get_context("spawn")  # fork would copy the driver's threads and device state
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        worker_config = config.model_copy(update={"backend": backend.name})
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._closed = False
        for rank in range(world):
            parent, child = ctx.Pipe()
            spec = WorkerSpec(
                rank=rank,
                world_size=world,
                init_method=init_method,
                backend=backend.name,
                config=worker_config,
                model_path=model_path,
                dtype=str(dtype).removeprefix("torch."),
                num_threads=_threads_per_rank(world),
            )
            proc = ctx.Process(
                target=worker_main, args=(spec, child), name=f"xllm-tp-rank{rank}", daemon=True
            )
            with _main_module_hidden():
                proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        # Workers go with the engine, even when nobody calls close().
        self._finalizer = weakref.finalize(self, _kill_all, list(self._procs))
        try:
            self._gather(timeout=START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallel: %d workers up (%s backend)", world, backend.name)

    # ------------------------------------------------------------------ what the engine calls

    def plan_kv_cache(self, config: EngineConfig, max_len: int) -> KVCachePlan:
        """Each rank sizes its own cache (its heads, its device); all hold the same number of
        blocks, the smallest any rank can afford."""
        plans: list[KVCachePlan] = self._call_all("plan_kv_cache", max_len)
        return min(plans, key=lambda p: p.num_blocks)

    def start(
        self, num_physical_blocks: int, max_model_len: int, eos_token_ids: set[int]
    ) -> TensorParallelExecutor:
        """Allocates every rank's KV cache and runner; returns self, the engine's runner."""
        self._call_all("start", (num_physical_blocks, max_model_len, set(eos_token_ids)))
        return self

    def execute(self, scheduled: list[ScheduledSequence]) -> StepResult:
        inputs, views = view_step(prepare_inputs(scheduled, self._block_size), scheduled)
        return self._call_all("step", (inputs, views))[0]

    # ------------------------------------------------------------------ plumbing

    def _call_all(self, command: str, payload: Any) -> list[Any]:
        self._check_open()
        # Pickled once for all ranks (what Connection.send does per call), received by recv().
        message = bytes(ForkingPickler.dumps((command, payload)))
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(message)
            except (BrokenPipeError, OSError):
                self._die(f"tensor-parallel worker rank {rank} is gone ({self._exit_text(rank)})")
        return self._gather(timeout=None)

    def _gather(self, timeout: float | None) -> list[Any]:
        """One reply per rank, in rank order; raises as the module docstring says."""
        replies: dict[int, tuple[str, Any]] = {}
        by_conn = {conn: rank for rank, conn in enumerate(self._conns)}
        by_sentinel = {proc.sentinel: rank for rank, proc in enumerate(self._procs)}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(replies) < self.world_size:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            waiting = [c for c, r in by_conn.items() if r not in replies]
            ready = wait(waiting + list(by_sentinel), timeout=left)
            for obj in ready:
                if obj in by_conn:
                    rank = by_conn[obj]
                    try:
                        replies[rank] = obj.recv()
                    except (EOFError, OSError):
                        self._die(f"tensor-parallel worker rank {rank} died ({self._exit_text(rank)})")
            for obj in ready:
                if obj in by_sentinel and by_sentinel[obj] not in replies:
                    rank = by_sentinel[obj]
                    self._die(f"tensor-parallel worker rank {rank} died ({self._exit_text(rank)})")
            errors = {r: text for r, (status, text) in replies.items() if status == "error"}
            if errors and deadline is None:
                deadline = time.monotonic() + _ERROR_GRACE_S
            if not ready and deadline is not None and time.monotonic() >= deadline:
                missing = sorted(set(range(self.world_size)) - set(replies))
                if errors:
                    first = min(errors)
                    self._die(
                        f"tensor-parallel worker rank {first} failed and ranks {missing} did not "
                        f"answer: {errors[first].splitlines()[0]}",
                        detail=errors[first],
                    )
                self._die(f"tensor-parallel workers {missing} did not answer within {timeout:g} s")
        errors = {r: text for r, (status, text) in replies.items() if status == "error"}
        if errors:
            first = min(errors)
            if len(errors) < self.world_size:
                self._die(
                    f"tensor-parallel worker rank {first} failed while other ranks succeeded: "
                    f"{errors[first].splitlines()[0]}",
                    detail=errors[first],
                )
            raise WorkerStepError(errors[first].splitlines()[0])
        return [replies[r][1] for r in range(self.world_size)]

    def _exit_text(self, rank: int) -> str:
        proc = self._procs[rank]
        proc.join(timeout=0.5)
        code = proc.exitcode
        if code is None:
            return "its pipe closed"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def _die(self, message: str, detail: str | None = None) -> None:
        if detail:
            logger.error("%s", detail)
        self.close(force=True)  # the survivors may be blocked in a collective with the dead rank
        raise WorkerDiedError(message)

    def _check_open(self) -> None:
        if self._closed:
            raise WorkerDiedError("the tensor-parallel workers were shut down")

    def close(self, force: bool = False) -> None:
        """Stops every worker: politely unless `force`, then by force (never blocks for long)."""
        if self._closed:
            return
        self._closed = True
        if not force:
            for conn in self._conns:
                try:
                    conn.send(("shutdown", None))
                except (BrokenPipeError, OSError):
                    pass
            deadline = time.monotonic() + _SHUTDOWN_TIMEOUT_S
            for proc in self._procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
        _kill_all(self._procs)
        for conn in self._conns:
            conn.close()
        self._finalizer.detach()


def _kill_all(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=_SHUTDOWN_TIMEOUT_S)

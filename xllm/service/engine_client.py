"""The server's side of `AsyncLLM`: turn requests into engine calls and merge their output streams.

One HTTP request may become several engine requests (one per prompt of a batched completion,
and one per choice when the engine's `SamplingParams` has no `n`). `EngineRun` starts them,
yields their cumulative `RequestOutput`s as they arrive, and — whatever way the consumer stops
(finished, client disconnected, server draining) — aborts every engine request that has not
finished so its KV blocks are freed. Nothing here knows about HTTP beyond raising `OpenAIError`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import anyio

from xllm.engine.errors import EngineDeadError
from xllm.service.errors import OpenAIError, bad_request, engine_dead, from_value_error

logger = logging.getLogger("xllm.service")


@lru_cache(maxsize=1)
def sampling_params_class() -> type:
    from xllm import SamplingParams

    return SamplingParams


@lru_cache(maxsize=1)
def sampling_param_names() -> frozenset[str]:
    """The keyword arguments `SamplingParams` accepts (a pydantic model, a dataclass or a plain class)."""
    cls = sampling_params_class()
    fields = getattr(cls, "model_fields", None) or getattr(cls, "__dataclass_fields__", None)
    if fields:
        return frozenset(fields)
    return frozenset(p for p in inspect.signature(cls).parameters if p != "self")


def make_sampling_params(required: dict[str, Any], optional: dict[str, Any]) -> Any:
    """Build `SamplingParams`; `required` keys must be supported, `optional` ones are dropped if not.

    `required` holds what the client asked for explicitly (a non-default value): silently
    ignoring it would return something the client did not ask for, so it is a 400 instead.
    """
    names = sampling_param_names()
    for key in required:
        if key not in names:
            raise bad_request(f"'{key}' is not supported by this server", param=key)
    kwargs = {**{k: v for k, v in optional.items() if k in names}, **required}
    try:
        return sampling_params_class()(**kwargs)
    except ValueError as exc:
        raise from_value_error(exc) from exc
    except TypeError as exc:  # a field of the wrong type that pydantic let through
        raise bad_request(str(exc)) from exc


@dataclass(slots=True)
class SubRequest:
    """One engine request of an HTTP request; its outputs become choices `choice_base + index`."""

    engine_request_id: str
    prompt_ids: list[int]
    prompt_text: str | None
    params: Any
    choice_base: int
    finished: bool = False
    last: Any = None  # the latest (cumulative) RequestOutput


@dataclass(slots=True)
class AdmissionTracker:
    """Counts the engine requests this server has started and not yet seen end.

    `AsyncLLM.generate` hands a request to the engine thread through a command queue, so for a
    moment it is in neither the engine's running nor its waiting count, and a burst of requests
    would all pass the --max-queue check in that window. The server is the engine's only client,
    so whatever it has outstanding beyond the engine's running + waiting is still in transit.
    """

    outstanding: int = 0

    def would_wait(self, engine: Any) -> int:
        """How many requests will be waiting in the engine once those in transit arrive."""
        stats = engine.stats()
        running, waiting = int(stats.num_running), int(stats.num_waiting)
        in_transit = max(0, self.outstanding - running - waiting)
        max_num_seqs = getattr(getattr(engine, "config", None), "max_num_seqs", None) or 0
        free_slots = max(0, max_num_seqs - running - waiting)
        return waiting + max(0, in_transit - free_slots)


@dataclass(slots=True)
class EngineRun:
    """Runs the sub-requests of one HTTP request and aborts the unfinished ones when closed."""

    engine: Any
    subs: list[SubRequest]
    active_ids: set[str]  # the server's set of in-flight engine request ids (for drain aborts)
    admission: AdmissionTracker = field(default_factory=AdmissionTracker)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _closed: bool = False
    _counted: bool = False  # whether `admission.outstanding` includes these subs

    async def _pump(self, i: int) -> None:
        sub = self.subs[i]
        try:
            prompt: dict[str, Any] = {"prompt_token_ids": sub.prompt_ids}
            if sub.prompt_text is not None:
                prompt["prompt"] = sub.prompt_text
            async for out in self.engine.generate(prompt, sub.params, sub.engine_request_id):
                await self._queue.put((i, out, None))
        except BaseException as exc:  # handed to the consumer, which decides the HTTP status
            await self._queue.put((i, None, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        await self._queue.put((i, None, None))

    async def outputs(self) -> AsyncIterator[tuple[SubRequest, Any]]:
        """Yield (sub-request, cumulative RequestOutput) until all sub-requests finish."""
        for sub in self.subs:
            self.active_ids.add(sub.engine_request_id)
        # Counted before the first await so the next request's --max-queue check sees these.
        self.admission.outstanding += len(self.subs)
        self._counted = True
        self._tasks = [asyncio.create_task(self._pump(i)) for i in range(len(self.subs))]
        pending = len(self.subs)
        try:
            while pending:
                i, out, exc = await self._queue.get()
                sub = self.subs[i]
                if exc is not None:
                    if isinstance(exc, EngineDeadError):
                        # Not this request's fault: the device is gone and the server is exiting.
                        raise engine_dead() from exc
                    if isinstance(exc, ValueError):
                        raise from_value_error(exc) from exc
                    if isinstance(exc, OpenAIError):
                        raise exc
                    raise RuntimeError(f"engine request {sub.engine_request_id} failed") from exc
                if out is None:
                    pending -= 1
                    sub.finished = True
                    continue
                if getattr(out, "error", None):
                    # The engine failed this request alone; its message may hold internals.
                    raise RuntimeError(f"engine request {sub.engine_request_id} failed: {out.error}")
                sub.last = out
                if out.finished:
                    sub.finished = True
                yield sub, out
        finally:
            await self.close()

    async def close(self) -> None:
        """Cancel the pumps and abort unfinished engine requests; safe to call twice."""
        # Shielded: this runs while Starlette cancels a stream whose client went away, and the
        # abort must still reach the engine or the request keeps its KV blocks until it ends.
        if self._closed:
            return
        self._closed = True
        if self._counted:
            # Here rather than in the pumps: a pump cancelled before it ever ran has no finally.
            self.admission.outstanding -= len(self.subs)
        with anyio.CancelScope(shield=True):
            for task in self._tasks:
                if not task.done():
                    task.cancel()
            for sub in self.subs:
                if not sub.finished:
                    try:
                        await self.engine.abort(sub.engine_request_id)
                    except Exception:  # an unknown id (already finished) is not an error here
                        logger.debug("abort of %s failed", sub.engine_request_id, exc_info=True)
                self.active_ids.discard(sub.engine_request_id)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

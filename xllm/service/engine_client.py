"""What the server asks of an engine (`EngineClient`), and running one HTTP request's engine requests.

`EngineClient` is the whole contract between the service and the engine layer: `AsyncLLM`
implements it in process, and a cluster router can implement it over HTTP, so nothing in the
service reaches past it. One HTTP request may become several engine requests, one per prompt
of a batched completion; the request's `n` choices of a prompt are one engine request
(`SamplingParams.n`), so they share the prompt's KV blocks. `EngineRun` starts them, yields
their cumulative `RequestOutput`s as they arrive, and — whatever way the consumer stops
(finished, client disconnected, server draining) — aborts every engine request that has not
finished so its KV blocks are freed. Nothing here knows about HTTP beyond raising `OpenAIError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio

from xllm.engine.errors import EngineDeadError
from xllm.engine.outputs import RequestOutput
from xllm.engine.sampling_params import SamplingParams
from xllm.service.errors import OpenAIError, bad_request, engine_dead, from_value_error

if TYPE_CHECKING:
    from xllm.engine.llm_engine import EngineStats, PromptInput

logger = logging.getLogger("xllm.service")


@runtime_checkable
class EngineClient(Protocol):
    """Everything the server needs of an engine; `AsyncLLM` is one.

    Kept small and asynchronous on purpose so that a remote implementation (a router speaking
    HTTP to engine processes) fits it: the properties are fixed once the engine is loaded, and
    `stats()` and `errored` are cheap reads the server makes per request and per scrape.
    """

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer: the server tokenizes prompts itself (so their length
        is checked and counted exactly) and applies its chat template."""

    @property
    def max_model_len(self) -> int:
        """Prompt plus completion tokens one request may hold."""

    @property
    def max_num_seqs(self) -> int:
        """Sequences the engine runs at once; beyond them requests wait (the --max-queue check)."""

    @property
    def model_name(self) -> str:
        """The name the model is listed under when the server is given none."""

    @property
    def errored(self) -> bool:
        """True once the engine has stopped for good; every later call fails with EngineDeadError."""

    def generate(
        self, prompt: PromptInput, sampling_params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request (all its `n` choices) until it finishes; raises
        ValueError before yielding anything when the request is refused, EngineDeadError when the
        engine dies. Closing the iterator early aborts the request."""

    def send_held_kv(self, transfer_id: str, destination: str, first_block: int, num_tokens: int) -> Any:
        """Sends prompt KV held for a decode instance (blocking: call it from a worker thread)."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stops a request and frees its KV blocks; its stream ends with finish_reason "abort"."""

    def stats(self) -> EngineStats:
        """Queue, KV-cache and token counters, read per request (--max-queue) and per scrape."""

    def cached_block_digests(self, limit: int) -> list[bytes]:
        """Up to `limit` SHA-256 digests of the full KV blocks in the prefix cache, most recently
        used first (`xllm.engine.kv_cache_manager.chain_hash`); a cluster instance publishes them
        for cache-aware routing. An engine without a prefix cache returns []."""

    def default_sampling_params(self) -> SamplingParams:
        """The model's generation_config.json defaults, for fields a request leaves unset."""

    def add_dead_callback(self, callback: Callable[[BaseException], None]) -> None:
        """Calls ``callback(cause)`` once when the engine dies, from any thread."""

    async def shutdown(self) -> None:
        """Stops the engine (a server shuts down only an engine it built itself)."""


def make_sampling_params(**kwargs: Any) -> SamplingParams:
    """`SamplingParams(**kwargs)`, its refusal of a value turned into a 400 naming the field."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise from_value_error(exc) from exc
    except TypeError as exc:  # a field of the wrong type that pydantic let through
        raise bad_request(str(exc)) from exc


@dataclass(slots=True)
class SubRequest:
    """One engine request of an HTTP request (one prompt); its `n` outputs become the response's
    choices `choice_base + index`."""

    engine_request_id: str
    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams
    choice_base: int
    finished: bool = False
    priority: int = 0  # the engine's scheduling class: lower runs first (Priority.ONLINE = 0)
    # A resumed request (the router's failover): output already streamed by another instance,
    # as token ids and as characters of text; its deltas start after them.
    resume_ids: list[int] = field(default_factory=list)
    resume_text_offset: int = 0
    # Prefill/decode hand-off: hold the prompt's KV for a decode instance (prefill part), or
    # receive it from where it is held (decode part; see `xllm.service.kv_source`).
    kv_hold: bool = False
    kv_source: Any = None


@dataclass(slots=True)
class AdmissionTracker:
    """Counts the engine requests this server has started and not yet seen end.

    `AsyncLLM.generate` hands a request to the engine thread through a command queue, so for a
    moment it is in neither the engine's running nor its waiting count, and a burst of requests
    would all pass the --max-queue check in that window. The server is the engine's only client,
    so whatever it has outstanding beyond the engine's running + waiting is still in transit.
    """

    outstanding: int = 0

    def would_wait(self, engine: EngineClient) -> int:
        """How many requests will be waiting in the engine once those in transit arrive."""
        stats = engine.stats()
        running, waiting = stats.num_running, stats.num_waiting
        in_transit = max(0, self.outstanding - running - waiting)
        free_slots = max(0, engine.max_num_seqs - running - waiting)
        return waiting + max(0, in_transit - free_slots)


@dataclass(slots=True)
class EngineRun:
    """Runs the sub-requests of one HTTP request and aborts the unfinished ones when closed."""

    engine: EngineClient
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
            if sub.resume_ids:
                prompt["resume_token_ids"] = sub.resume_ids
            if sub.kv_hold:
                prompt["kv_hold"] = True
            if sub.kv_source is not None:
                prompt["kv_source"] = sub.kv_source
            async for out in self.engine.generate(prompt, sub.params, sub.engine_request_id, sub.priority):
                await self._queue.put((i, out, None))
        except BaseException as exc:  # handed to the consumer, which decides the HTTP status
            await self._queue.put((i, None, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        await self._queue.put((i, None, None))

    async def outputs(self) -> AsyncIterator[tuple[SubRequest, RequestOutput]]:
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
                if out.error:
                    # The engine failed this request alone; its message may hold internals.
                    raise RuntimeError(f"engine request {sub.engine_request_id} failed: {out.error}")
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

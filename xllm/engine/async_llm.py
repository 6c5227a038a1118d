"""`AsyncLLM`: the engine behind the server, streaming each request's outputs to an asyncio caller.

The engine core runs in one background thread (torch releases the GIL inside its ops, so the
event loop stays responsive). Callers never touch the engine directly: they send commands (add,
abort) through a thread-safe queue that the loop drains between steps, and receive outputs on a
per-request asyncio queue.

A failing step fails only its own requests, unless the backend calls the error fatal or it is
the K-th failure in a row (see `LLMEngine.step`); then, as when the loop itself fails, the engine
is dead: `errored` turns true, every open stream and every queued command is answered with
`EngineDeadError`, every later call gets it at once, and the dead-callbacks run (the server
exits on them so that its supervisor restarts it).

Commands and death race: a caller may enqueue just as the loop dies. `_send` and the dying loop
take one lock around "is the queue still open?", so a command is either enqueued before the loop
closes the queue (and the loop answers it while draining) or refused by `_send` itself.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from xllm.engine.config import EngineConfig
from xllm.engine.errors import EngineDeadError
from xllm.engine.faults import describe
from xllm.engine.llm_engine import EngineStats, LLMEngine, PromptInput
from xllm.engine.outputs import RequestOutput
from xllm.engine.sampling_params import SamplingParams

logger = logging.getLogger("xllm.engine")

_IDLE_WAIT_S = 0.5


class AsyncLLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.config = EngineConfig(model=None if model is None else str(model), **kwargs)
        self.engine = LLMEngine(self.config)
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.errored = False
        self.dead_error: BaseException | None = None  # what killed the loop, once errored
        # Guards the hand-over between `_send` and a loop that stops: set `_refusal` under it and
        # nothing more is enqueued; see the module docstring.
        self._lock = threading.Lock()
        self._refusal: EngineDeadError | None = None
        self._dead_callbacks: list[Callable[[BaseException], None]] = []

    # ------------------------------------------------------------------ properties the server reads

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    @property
    def model_name(self) -> str:
        """The name to serve the model under: its path, or "xllm-default" for the embedded model."""
        return self.engine.model_path if self.config.model is not None else "xllm-default"

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def cached_block_digests(self, limit: int) -> list[bytes]:
        """Digests of the prefix cache's blocks, most recently used first, at most `limit`.

        Read from the caller's thread rather than through the command queue, like `stats()`:
        `KVCacheManager.cached_block_digests` copies the engine's dicts with single C calls that
        the GIL keeps whole, so a step running on the engine thread cannot tear them; what comes
        back may be a step old, which is all a load report needs.
        """
        return self.engine.cached_block_digests(limit)

    def default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ requests

    async def generate(
        self,
        prompt: PromptInput,
        sampling_params: SamplingParams | None,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Queues the request and yields cumulative outputs until it finishes.

        Raises ValueError (before yielding anything) when the request is rejected. Closing the
        generator early (a client that went away) aborts the request and frees its blocks.
        """
        self._check_alive()
        if request_id in self._streams:
            # Checked here, not only by the engine: registering this stream would replace the
            # live one's, and the rejection's clean-up would then abort the other request.
            raise ValueError(f"request id {request_id!r} is already in use")
        self.start()
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        admitted = loop.create_future()
        entry = (loop, stream)
        self._streams[request_id] = entry
        self._send(("add", request_id, prompt, sampling_params, priority, loop, admitted))
        finished = False
        try:
            await admitted  # re-raises the engine's ValueError for a rejected request
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if finished:
                    # The id is free as soon as the last output is out, even if the caller
                    # never resumes this generator to let it return.
                    del self._streams[request_id]
                yield item
                if finished:
                    return
        finally:
            if self._streams.get(request_id) is entry:
                del self._streams[request_id]
            if not finished:
                self._send(("abort", request_id, None))

    def send_held_kv(self, transfer_id: str, destination: str, first_block: int, num_tokens: int):
        """Sends prompt KV this (prefill) engine holds to a decode instance's transfer engine.
        Blocking, from any thread but the engine's: held blocks are read, never written, and the
        hold ends on the engine thread once the send is over."""
        self._check_alive()
        stats = self.engine.handoff.send_held(transfer_id, destination, first_block, num_tokens)
        self._wakeup.set()
        return stats

    async def abort(self, request_id: str) -> None:
        """Aborts a request; its stream ends with finish_reason "abort". Returns at once when the
        engine is dead or stopped (there is nothing left to abort)."""
        if self._thread is None:
            return  # the loop never started, so no request was ever queued
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._send(("abort", request_id, (loop, done)))
        await done

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_loop, name="xllm-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    def add_dead_callback(self, callback: Callable[[BaseException], None]) -> None:
        """Calls ``callback(cause)`` once when the engine dies, from the engine's thread (at once,
        here, if it is dead already). Not called on a normal shutdown."""
        with self._lock:
            if not self.errored:
                self._dead_callbacks.append(callback)
                return
        assert self.dead_error is not None
        callback(self.dead_error)

    def _check_alive(self) -> None:
        if self.errored:
            raise self._dead_exception()
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    def _dead_exception(self) -> EngineDeadError:
        """A fresh EngineDeadError for one caller (an exception raised in several tasks would
        collect all their tracebacks), caused by what killed the loop."""
        cause = self.dead_error
        if isinstance(cause, EngineDeadError):  # the engine's own verdict, e.g. a fatal device error
            error = EngineDeadError(str(cause))
            error.__cause__ = cause.__cause__
        else:
            error = EngineDeadError(f"the engine loop has stopped: {describe(cause) if cause else 'unknown'}")
            error.__cause__ = cause
        return error

    def _send(self, command: tuple) -> None:
        with self._lock:
            refusal = self._refusal
            if refusal is None:
                self._commands.put(command)
                self._wakeup.set()
                return
        _refuse(command, refusal)

    # ------------------------------------------------------------------ the loop thread

    def _run_loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(_IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
            self._close_streams()
        except BaseException as exc:  # a fatal step or a failure of the loop itself
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """The loop cannot go on: mark the engine dead and answer everybody who waits on it."""
        logger.critical(
            "engine dead: %s",
            describe(exc),
            # LLMEngine.step already logged the device error behind its own EngineDeadError.
            exc_info=None if isinstance(exc, EngineDeadError) else exc,
        )
        with self._lock:
            self.dead_error = exc
            self.errored = True
            callbacks, self._dead_callbacks = self._dead_callbacks, []
        self._close_commands(self._dead_exception())
        for loop, stream in list(self._streams.values()):
            _post(loop, stream.put_nowait, self._dead_exception())
        try:
            # A fatal step has freed its requests already; after a failure of the loop itself
            # this returns their KV blocks, so /metrics does not show a full cache forever.
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
        except Exception:
            logger.exception("could not free the requests of the dead engine")
        for callback in callbacks:
            try:
                callback(exc)
            except Exception:  # one broken listener must not keep the others from hearing
                logger.exception("engine-dead callback %r failed", callback)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind = command[0]
            if kind == "add":
                _, rid, prompt, params, priority, loop, admitted = command
                try:
                    self.engine.add_request(rid, prompt, params, priority=priority)
                except Exception as exc:  # a rejected request is reported to its caller alone
                    loop.call_soon_threadsafe(_set_exception, admitted, exc)
                else:
                    loop.call_soon_threadsafe(_set_result, admitted, None)
            elif kind == "abort":
                _, rid, waiter = command
                out = self.engine.abort_request(rid)
                if out is not None:
                    self._deliver(out)
                if waiter is not None:
                    loop, done = waiter
                    loop.call_soon_threadsafe(_set_result, done, None)

    def _close_commands(self, refusal: EngineDeadError) -> None:
        """Closes the command queue for good: answers what it holds, and makes `_send` refuse
        anything later with `refusal` (adds fail with it, aborts return)."""
        with self._lock:
            self._refusal = refusal
        # Nothing can be enqueued any more, so this drain leaves no command unanswered.
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            _refuse(command, refusal)

    def _close_streams(self) -> None:
        """On shutdown: refuses queued and later additions and ends every open stream with
        finish_reason "abort", so that no caller waits forever on a loop that has stopped."""
        self._close_commands(EngineDeadError("the engine is shutting down"))
        for request_id in list(self.engine.requests):
            out = self.engine.abort_request(request_id)
            if out is not None:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, out)


def _refuse(command: tuple, error: EngineDeadError) -> None:
    """Answers a command the loop will never run: an add fails with a copy of `error`, an abort
    returns (there is nothing left to abort)."""
    if command[0] == "add":
        _, _, _, _, _, loop, admitted = command
        copy = EngineDeadError(str(error))
        copy.__cause__ = error.__cause__
        _post(loop, _set_exception, admitted, copy)
    elif command[2] is not None:
        loop, done = command[2]
        _post(loop, _set_result, done, None)


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object) -> None:
    """``loop.call_soon_threadsafe`` for a caller's loop that may have closed since it asked (the
    caller is gone then, and nobody is left to answer)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        logger.debug("event loop of a caller closed before its answer", exc_info=True)


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


__all__ = ["AsyncLLM", "EngineConfig"]

"""`AsyncLLM`: the engine behind the server, streaming each request's outputs to an asyncio caller.

The engine core runs in one background thread (torch releases the GIL inside its ops, so the
event loop stays responsive). Callers never touch the engine directly: they send commands (add,
abort) through a thread-safe queue that the loop drains between steps, and receive outputs on a
per-request asyncio queue. A failing step fails only its own requests (see `LLMEngine.step`); if
the loop itself dies, every stream gets `EngineDeadError` and `errored` turns true.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from xllm.engine.config import EngineConfig
from xllm.engine.errors import EngineDeadError
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
        self.dead_error: BaseException | None = None

    # ------------------------------------------------------------------ properties the server reads

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_name(self) -> str:
        return self.engine.model_path

    def stats(self) -> EngineStats:
        return self.engine.stats()

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

    async def abort(self, request_id: str) -> None:
        """Aborts a request; its stream ends with finish_reason "abort"."""
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

    def _check_alive(self) -> None:
        if self.errored:
            raise EngineDeadError(f"the engine loop has stopped: {self.dead_error}")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

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
        except BaseException as exc:  # the loop itself failed: nobody can be served any more
            logger.exception("engine loop died")
            self.errored = True
            self.dead_error = exc
            for loop, stream in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.put_nowait, EngineDeadError(str(exc)))

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

    def _close_streams(self) -> None:
        """On shutdown: refuses queued additions and ends every open stream with finish_reason
        "abort", so that no caller waits forever on a loop that has stopped."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                _, _, _, _, _, loop, admitted = command
                loop.call_soon_threadsafe(
                    _set_exception, admitted, EngineDeadError("the engine is shutting down")
                )
            elif command[2] is not None:
                loop, done = command[2]
                loop.call_soon_threadsafe(_set_result, done, None)
        for request_id in list(self.engine.requests):
            out = self.engine.abort_request(request_id)
            if out is not None:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, out)


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


__all__ = ["AsyncLLM", "EngineConfig"]

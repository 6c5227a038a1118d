"""Run the app under uvicorn, with a graceful drain on SIGTERM.

uvicorn's own SIGTERM handling closes the listening socket at once, so new clients would see
"connection refused" rather than a 503, and it re-raises the signal after shutdown, so the
process would die by SIGTERM instead of exiting 0. `DrainingServer` replaces that: the first
SIGTERM flips the app to draining (new /v1 requests get 503, /health says "draining"), waits
for in-flight requests up to the shutdown timeout, aborts what is left, and only then asks
uvicorn to stop; `serve()` then returns 0. SIGINT keeps uvicorn's behaviour (Ctrl+C stops now);
further SIGTERMs during a drain are ignored.

A server whose engine died (a device fault, or too many failed steps in a row) cannot serve
again, and answering 503 forever would hide that from whatever supervises it. So it stops: the
engine has already failed every in-flight request, their responses get a moment to reach the
clients, and `serve()` returns 1 so that the supervisor restarts the process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from types import FrameType

import uvicorn

from xllm.service.app import ServerConfig, ServerHook, ServerState, create_app

logger = logging.getLogger("xllm.service")

# After the engine died: how long in-flight responses (already failed by the engine) may take to
# reach their clients before the server stops anyway.
ENGINE_DEAD_GRACE_S = 2.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout_s = shutdown_timeout_s
        self._drain_task: asyncio.Task | None = None
        self._exit_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._loop is None:
            super().handle_exit(sig, frame)
            return
        if self._drain_task is not None:
            # Repeated SIGTERMs are common (`timeout` and process managers signal the child and
            # its group); the drain deadline already bounds the wait, and SIGINT still forces.
            return
        # Runs in the signal handler, on the loop's thread between bytecodes: only schedule.
        self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        logger.info(
            "SIGTERM: draining %d in-flight requests (timeout %.0fs)",
            self.state.in_flight,
            self.shutdown_timeout_s,
        )
        await self.state.drain(self.shutdown_timeout_s)
        logger.info("drained; shutting down")
        self.should_exit = True

    def exit_on_engine_death(self, exc: BaseException) -> None:
        """Stops the server for good once the engine died; runs on the event loop."""
        if self._exit_task is not None:
            return
        logger.error(
            "engine dead (%s: %s); stopping the server with exit status 1 so that its supervisor restarts it",
            type(exc).__name__,
            exc,
        )
        self._exit_task = asyncio.get_running_loop().create_task(self._exit_when_answered())

    async def _exit_when_answered(self) -> None:
        deadline = time.monotonic() + ENGINE_DEAD_GRACE_S
        while self.state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def serve(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    hooks: Sequence[ServerHook] = (),
) -> int:
    """Serve until SIGTERM (drained, returns 0) or SIGINT; returns 1 if the model failed to load
    or the engine died. `hooks` follow the server's life (see `ServerHook`)."""
    state = ServerState(config)
    state.hooks.extend(hooks)
    app = create_app(config, state=state)
    for hook in hooks:  # a hook may serve routes of its own (the cluster's live role switch)
        api_router = getattr(hook, "api_router", None)
        if callable(api_router):
            app.include_router(api_router())
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        # uvicorn's own grace period only covers connections still open after our drain.
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = DrainingServer(uv_config, state, config.shutdown_timeout_s)

    def on_load_failed(_: BaseException) -> None:
        server.should_exit = True

    state.on_load_failed = on_load_failed
    state.on_engine_dead = server.exit_on_engine_death
    server.run()
    return 1 if state.load_error is not None or state.engine_dead_error is not None else 0

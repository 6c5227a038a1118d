"""The FastAPI app of `xllm serve`: routes, the loading/draining state machine, auth and access log.

`create_app(config)` returns an app whose lifespan loads the engine in a background thread, so
/health answers 503 "loading" at once and 200 when the model is ready. A pure-ASGI middleware
wraps every request: it assigns the request id, refuses /v1/* with 401 (bad key) or 503
(loading or draining), counts in-flight requests for a graceful drain, turns anything
unexpected into a generic 500, and writes one access line per request to the `xllm.access`
logger. The OpenAI logic itself lives in `serving.py`, Anthropic's Messages API in
`anthropic_serving.py`.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xllm import __version__
from xllm.service.anthropic_errors import MESSAGES_PATH, AnthropicRoute, anthropic_error_response
from xllm.service.anthropic_protocol import AnthropicErrorResponse, MessagesRequest, MessagesResponse
from xllm.service.anthropic_serving import MessagesServing
from xllm.service.engine_client import EngineClient
from xllm.service.errors import OpenAIError, install_error_handlers, internal_error
from xllm.service.kv_source import KV_SEND_PATH
from xllm.service.metrics import ServiceMetrics
from xllm.service.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    KVSendRequest,
    ModelCard,
    ModelList,
    dump,
    stream_response,
    tailor_openapi,
)
from xllm.service.serving import PRIORITY_HEADER, RequestContext, Serving, new_request_id, request_priority

T = TypeVar("T")
logger = logging.getLogger("xllm.service")
access_logger = logging.getLogger("xllm.access")

# OpenAI's id prefixes, so ids look familiar in client logs.
REQUEST_ID_PREFIXES = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl", MESSAGES_PATH: "msg"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500, 503)
}


@dataclass
class ServerConfig:
    """What `xllm serve` was asked for; `engine_kwargs` go to `AsyncLLM(...)` unchanged."""

    model: str | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int | None = None
    shutdown_timeout_s: float = 30.0
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


class ServerHook(Protocol):
    """Something that follows the server's life, e.g. the cluster's registration
    (`xllm.cluster.instance.RegistryHook`); `serve(..., hooks=[...])` installs them. Each runs on
    the event loop and must not hold it: slow work belongs in a task of its own. Their errors are
    logged, never raised into the server."""

    async def on_ready(self, state: ServerState) -> None:
        """The model is loaded and requests are served."""

    async def on_drain(self, state: ServerState) -> None:
        """SIGTERM: the drain starts (before in-flight requests are waited for)."""

    async def on_shutdown(self, state: ServerState) -> None:
        """The app is stopping (after a drain, or at once on SIGINT or a failure)."""


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


class ServerState:
    """The app's mutable state; only the event loop thread writes it (the loader posts back)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.phase = Phase.LOADING
        self.engine: EngineClient | None = None
        self.serving: Serving | None = None
        self.load_error: BaseException | None = None
        self.in_flight = 0  # /v1 requests being served, for the drain
        self.active_ids: set[str] = set()  # engine request ids in flight, aborted at the drain deadline
        self.model_name = config.served_model_name or (
            Path(config.model).name if config.model else "xllm-default"
        )
        self.metrics = ServiceMetrics(lambda: self.engine, lambda: self.model_name)
        self.on_load_failed: Callable[[BaseException], None] | None = None
        # Set (on the event loop) when the engine dies after loading; `serve()` then exits with 1.
        self.engine_dead_error: BaseException | None = None
        self.on_engine_dead: Callable[[BaseException], None] | None = None
        self.hooks: list[ServerHook] = []
        self.hook_tasks: set[asyncio.Task] = set()  # running on_ready calls (kept from the GC)

    async def run_hooks(self, event: str) -> None:
        for hook in self.hooks:
            try:
                await getattr(hook, event)(self)
            except Exception:
                logger.exception("server hook %r failed in %s", hook, event)

    def ready(self, engine: EngineClient) -> None:
        self.engine = engine
        if not self.config.served_model_name:
            # As vLLM: a model given by path is served under that path; the embedded default
            # model under the short name "xllm-default" rather than its cache directory.
            self.model_name = engine.model_name
        self.serving = Serving(engine, self.model_name, self.metrics, self.active_ids, self.config.max_queue)
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY

    def unavailable(self) -> OpenAIError | None:
        """The 503 to answer with instead of serving, or None when requests are welcome."""
        if self.phase is Phase.READY:
            if self.engine is not None and self.engine.errored:
                # The engine loop died (AsyncLLM.errored): nothing can be served until a restart.
                return OpenAIError(503, "The engine has stopped; see the server log.", code="engine_dead")
            return None
        messages = {
            Phase.LOADING: ("The model is loading; retry shortly.", "model_loading"),
            Phase.FAILED: ("The model failed to load; see the server log.", "model_load_failed"),
            Phase.DRAINING: ("The server is shutting down and accepts no new requests.", "draining"),
        }
        message, code = messages[self.phase]
        return OpenAIError(503, message, code=code, headers={"Retry-After": "5"})

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests, let in-flight ones finish for up to `timeout_s`, then abort the rest."""
        if self.phase is not Phase.FAILED:
            self.phase = Phase.DRAINING
        await self.run_hooks("on_drain")  # e.g. leave the cluster, so no new work is routed here
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight and self.engine is not None:
            logger.warning("drain timeout: aborting %d in-flight engine requests", len(self.active_ids))
            for rid in list(self.active_ids):
                try:
                    await self.engine.abort(rid)
                except Exception:
                    logger.debug("abort of %s failed", rid, exc_info=True)
            # Give the aborted streams a moment to send their last event.
            grace = time.monotonic() + 2.0
            while self.in_flight and time.monotonic() < grace:
                await asyncio.sleep(0.05)


# What the access log records for a client that left before its answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client goes away.

    Starlette notices a disconnect only while it streams a response; a non-streaming request
    (or a stream still waiting for its first token) would otherwise run to the end for nobody.
    Returns None when the client disconnected first.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return None


async def respond(request: Request, work: Awaitable[BaseModel | AsyncIterator[str]]) -> Response:
    """The HTTP response of an endpoint's `work`: its whole response as JSON, or its events as a
    server-sent-event stream; 499 for a client that left first (see `until_disconnected`)."""
    result = await until_disconnected(request, work)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(result, BaseModel):
        return JSONResponse(dump(result))
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def default_engine_factory(config: ServerConfig) -> Callable[[], EngineClient]:
    def build() -> EngineClient:
        from xllm import AsyncLLM

        return AsyncLLM(model=config.model, **config.engine_kwargs)

    return build


class ServiceMiddleware:
    """Request id, auth, readiness, in-flight count, last-resort 500 and the access log."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    def _authorized(self, scope: Scope, anthropic: bool) -> bool:
        key = self.state.config.api_key
        if not key:
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        # Constant-time compare so the key cannot be guessed byte by byte from timings.
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return True
        # Anthropic's clients send the key as `x-api-key`.
        api_key = headers.get(b"x-api-key") if anthropic else None
        return api_key is not None and hmac.compare_digest(api_key.strip(), key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        start = time.monotonic()
        rid = new_request_id(REQUEST_ID_PREFIXES.get(path, "req"))
        ctx = RequestContext(request_id=rid, arrival_s=start)
        # Credentials a decode part passes on when it asks a prefill instance for KV.
        ctx.auth_headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers", [])
            if k in (b"authorization", b"x-api-key")
        }
        scope.setdefault("state", {})["ctx"] = ctx
        status = {"code": 0, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        protected = path.startswith("/v1/")
        anthropic = path == MESSAGES_PATH
        # /v1/messages answers in Anthropic's error shape, every other path in OpenAI's.
        respond = anthropic_error_response if anthropic else OpenAIError.response
        if protected:
            self.state.in_flight += 1
        try:
            refusal: OpenAIError | None = None
            if protected and not self._authorized(scope, anthropic):
                how = (
                    "'x-api-key: <key>' or 'Authorization: Bearer <key>'"
                    if anthropic
                    else "'Authorization: Bearer <key>'"
                )
                refusal = OpenAIError(
                    401,
                    f"Missing or invalid API key; send it as {how}.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            elif protected:
                refusal = self.state.unavailable()
            if refusal is not None:
                await respond(refusal)(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception:
            logger.exception("request %s %s failed", rid, path)
            if not status["started"]:
                await respond(internal_error())(scope, receive, send_wrapper)
        finally:
            if protected:
                self.state.in_flight -= 1
            self.state.metrics.http_requests.labels(str(status["code"])).inc()
            access_logger.info(
                '%s "%s %s" %d prompt_tokens=%d completion_tokens=%d latency_ms=%.1f',
                rid,
                scope.get("method", "-"),
                path,
                status["code"],
                ctx.prompt_tokens,
                ctx.completion_tokens,
                (time.monotonic() - start) * 1000.0,
            )


def create_app(
    config: ServerConfig,
    engine_factory: Callable[[], EngineClient] | None = None,
    state: ServerState | None = None,
    engine: EngineClient | None = None,
) -> FastAPI:
    """Build the app; `engine_factory` (run in a thread) defaults to `AsyncLLM(model=..., **engine_kwargs)`.

    `engine` serves an engine the caller has already built (e.g. to embed the server in a
    process that owns an `AsyncLLM`, or any other `EngineClient`); the caller keeps ownership,
    so the app does not shut it down.
    """
    if engine is not None and engine_factory is not None:
        raise ValueError("pass either engine or engine_factory, not both")
    state = state or ServerState(config)
    owns_engine = engine is None
    factory = (lambda: engine) if engine is not None else engine_factory or default_engine_factory(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def on_engine_dead(exc: BaseException) -> None:
            # Its in-flight requests have had their EngineDeadError already, and /health says
            # 503 from now on (unavailable() reads engine.errored); the server decides the rest.
            state.engine_dead_error = exc
            if state.on_engine_dead is not None:
                state.on_engine_dead(exc)

        def on_loaded(engine: EngineClient) -> None:
            state.ready(engine)
            logger.info("model %s ready", state.model_name)
            engine.add_dead_callback(engine_died)
            if state.hooks:
                task = loop.create_task(state.run_hooks("on_ready"))
                state.hook_tasks.add(task)
                task.add_done_callback(state.hook_tasks.discard)

        def engine_died(exc: BaseException) -> None:
            # Runs on the engine's thread; the state is only written on the event loop. A borrowed
            # engine may outlive this app and its loop.
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_engine_dead, exc)

        def on_failed(exc: BaseException) -> None:
            state.load_error = exc
            state.phase = Phase.FAILED
            logger.error("model failed to load: %s", exc, exc_info=exc)
            if state.on_load_failed is not None:
                state.on_load_failed(exc)

        def load() -> None:
            try:
                engine = factory()
            except BaseException as exc:
                loop.call_soon_threadsafe(on_failed, exc)
            else:
                loop.call_soon_threadsafe(on_loaded, engine)

        # A daemon thread, not the default executor: a SIGTERM during loading must not wait for it.
        threading.Thread(target=load, name="xllm-model-loader", daemon=True).start()
        try:
            yield
        finally:
            for task in list(state.hook_tasks):
                task.cancel()
            await state.run_hooks("on_shutdown")
            if state.engine is not None and owns_engine:
                try:
                    await state.engine.shutdown()
                except Exception:
                    logger.exception("engine shutdown failed")

    app = FastAPI(title="xllm OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.xllm = state
    install_error_handlers(app)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # FastAPI builds the document once; it is tailored to what this server answers, and
        # states the model's vocabulary once that is loaded.
        vocab_size = state.serving.vocab_size if state.serving is not None else None
        return tailor_openapi(build_openapi(), api_key=bool(config.api_key), vocab_size=vocab_size)

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(ServiceMiddleware, state=state)

    def serving() -> Serving:
        # The middleware already refused /v1/* unless ready; this only guards direct calls.
        if state.serving is None or state.phase is not Phase.READY:
            raise state.unavailable() or OpenAIError(503, "The server is not ready.")
        return state.serving

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> JSONResponse:
        refusal = state.unavailable()
        if refusal is not None:
            return refusal.response()
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models() -> ModelList:
        s = serving()
        return ModelList(
            data=[ModelCard(id=s.served_model_name, root=config.model, max_model_len=s.max_model_len)]
        )

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def model(model_id: str) -> ModelCard:
        s = serving()
        s.check_model(model_id)
        return ModelCard(id=s.served_model_name, root=config.model, max_model_len=s.max_model_len)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={**ERROR_RESPONSES, **stream_response(CompletionChunk)},
    )
    async def completions(body: CompletionRequest, request: Request) -> Response:
        ctx: RequestContext = request.state.ctx
        ctx.priority = request_priority(body, request.headers.get(PRIORITY_HEADER))
        return await respond(request, serving().completions(body, ctx))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**ERROR_RESPONSES, **stream_response(ChatCompletionChunk)},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        ctx: RequestContext = request.state.ctx
        ctx.priority = request_priority(body, request.headers.get(PRIORITY_HEADER))
        return await respond(request, serving().chat(body, ctx))

    @app.post(KV_SEND_PATH, responses=ERROR_RESPONSES)
    async def kv_send(body: KVSendRequest) -> dict[str, Any]:
        """Prefill/decode hand-off: a decode instance asks for the prompt KV this one holds."""
        return await serving().send_held_kv(body)

    # Anthropic's Messages API; its route class answers its errors in Anthropic's shape.
    anthropic = APIRouter(route_class=AnthropicRoute)

    @anthropic.post(
        MESSAGES_PATH,
        response_model=MessagesResponse,
        responses={code: {"model": AnthropicErrorResponse} for code in ERROR_RESPONSES},
    )
    async def messages(body: MessagesRequest, request: Request) -> Response:
        ctx: RequestContext = request.state.ctx
        return await respond(request, MessagesServing(serving()).create(body, ctx))

    app.include_router(anthropic)
    return app

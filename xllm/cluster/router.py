"""The cluster router: one OpenAI endpoint in front of many `xllm serve` instances.

`create_router_app(registry, policy)` answers the same API as `xllm serve` (/v1/completions,
/v1/chat/completions and /v1/messages validated by the service's pydantic models, /v1/models,
/health, /metrics) and forwards each request to the instance a placement policy (`policies.py`)
picks; the instance's answer comes back as the client's: JSON whole, server-sent events chunk by
chunk, status codes and error bodies preserved (`relay.py`). The router keeps no membership of
its own: a background task polls `registry.members()` every `POLL_INTERVAL_S`, so a restarted
router rebuilds its view. An instance that cannot be reached (or answers 503) is replaced by
another member; a stream that breaks mid-way continues on another one (`failover.py`); with
prefill and decode instances up, requests are split between them (`disagg.py`); with none left
the client gets a 503. Admin routes: `/cluster/instances` (the view), `.../{id}/drain` (no new
placements), `.../{id}/role` (a live role switch; `slo.py` makes them on its own), and
`/cluster/policy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.types import ASGIApp, Receive, Scope, Send

from xllm import __version__
from xllm.cluster import disagg, failover, policies
from xllm.cluster.policies import PolicyName
from xllm.cluster.registry import InstanceLoad, Member, Registry, Role, Status
from xllm.cluster.relay import (
    INSTANCE_HEADER,
    ClientGone,
    Relay,
    RoutedRequest,
    Upstream,
    passed_headers,
)
from xllm.cluster.slo import SloBalancer
from xllm.service.anthropic_errors import MESSAGES_PATH, AnthropicRoute
from xllm.service.anthropic_protocol import MessagesRequest
from xllm.service.app import CLIENT_CLOSED_REQUEST
from xllm.service.errors import OpenAIError, install_error_handlers, internal_error
from xllm.service.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from xllm.service.serving import chat_prompt_text

logger = logging.getLogger("xllm.cluster")

POLL_INTERVAL_S = 0.5
MAX_ROUTED_DIGESTS = 16384  # per instance: the blocks of a few hundred long prompts


class PolicyChange(BaseModel):
    policy: PolicyName


class RoleSwitch(BaseModel):
    role: Role
    drain_timeout_s: float = Field(60.0, ge=0.0, le=3600.0)


class NoInstanceError(OpenAIError):
    def __init__(self, detail: str) -> None:
        super().__init__(503, f"No instance can take the request: {detail}", code="no_instance")


class RouterMetrics:
    """The router's own counters plus a per-instance view of the latest published loads."""

    def __init__(self, members: Callable[[], list[tuple[Member, Status]]]) -> None:
        self.registry = CollectorRegistry()
        self.routed = Counter(
            "xllm:router_requests_routed",
            "Requests placed on an instance.",
            ["instance"],
            registry=self.registry,
        )
        self.redispatched = Counter(
            "xllm:router_requests_redispatched",
            "Placements retried on another instance (unreachable or unavailable).",
            ["instance"],
            registry=self.registry,
        )
        self.resumed = Counter(
            "xllm:router_streams_resumed",
            "Streams continued on another instance after the one serving them died mid-stream.",
            ["instance"],
            registry=self.registry,
        )
        self.pd_requests = Counter(
            "xllm:router_pd_requests",
            "Requests served prefill-then-decode, by path (decode '-': finished at its first token).",
            ["prefill", "decode"],
            registry=self.registry,
        )
        self.pd_fallbacks = Counter(
            "xllm:router_pd_fallbacks",
            "Requests served whole because the prefill/decode split was not possible.",
            registry=self.registry,
        )
        self.role_switches = Counter(
            "xllm:router_role_switches",
            "Instances switched between prefill and decode (by an admin or the slo policy).",
            ["instance", "from_role", "to_role", "by"],
            registry=self.registry,
        )
        self.failed = Counter(
            "xllm:router_requests_failed",
            "Requests the router could not complete (no instance left, or the stream broke).",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_InstanceCollector(members))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _InstanceCollector(Collector):
    def __init__(self, members: Callable[[], list[tuple[Member, Status]]]) -> None:
        self.members = members

    def collect(self) -> Iterator[Metric]:
        labels = ["instance", "role", "status"]
        running = GaugeMetricFamily("xllm:instance_num_requests_running", "Running requests.", labels=labels)
        waiting = GaugeMetricFamily("xllm:instance_num_requests_waiting", "Waiting requests.", labels=labels)
        kv = GaugeMetricFamily("xllm:instance_kv_cache_usage_perc", "KV-cache usage, 0..1.", labels=labels)
        transfers = CounterMetricFamily(
            "xllm:instance_kv_transfers", "KV transfers done, by direction.", labels=[*labels, "direction"]
        )
        transfer_bytes = CounterMetricFamily(
            "xllm:instance_kv_transfer_bytes",
            "KV bytes transferred, by direction.",
            labels=[*labels, "direction"],
        )
        failures = CounterMetricFamily(
            "xllm:instance_kv_transfer_failures", "KV transfers failed.", labels=labels
        )
        for member, status in self.members():
            values = [member.info.id, member.info.role.value, status.value]
            load = member.load or InstanceLoad()
            running.add_metric(values, load.num_requests_running)
            waiting.add_metric(values, load.num_requests_waiting)
            kv.add_metric(values, load.kv_cache_usage)
            transfers.add_metric([*values, "sent"], load.kv_transfers_sent)
            transfers.add_metric([*values, "received"], load.kv_transfers_received)
            transfer_bytes.add_metric([*values, "sent"], load.kv_transfer_bytes_sent)
            transfer_bytes.add_metric([*values, "received"], load.kv_transfer_bytes_received)
            failures.add_metric(values, load.kv_transfer_failures)
        yield from (running, waiting, kv, transfers, transfer_bytes, failures)


class RouterState:
    """The router's view of the cluster and its own lifecycle (read by `DrainingServer`)."""

    def __init__(
        self,
        registry: Registry,
        policy: PolicyName,
        tokenizer_path: str | None = None,
        limits: policies.CacheAwareLimits | None = None,
        pd: bool = True,
        slo: SloBalancer | None = None,
    ) -> None:
        self.slo = slo  # moves instances between prefill and decode on its own (--slo)
        self.registry = registry
        self.policy = policy
        self.limits = limits or policies.CacheAwareLimits()
        self.tokenizer_path = tokenizer_path
        self.tokenizer: Any = None
        self.members: list[Member] = []
        # Reads of the registry started / applied: a read that started before the last applied
        # one is stale (the poll may overlap the re-read after a role switch).
        self._reads_started = 0
        self._read_applied = 0
        self.drained: set[str] = set()  # ids the router was asked to drain; kept across polls
        # id -> time.time() of a failed connection: dead until its load is refreshed after that.
        self.unreachable: dict[str, float] = {}
        # Requests this router has on each instance now. Published loads lag by up to a second,
        # so a burst would all land on the member that looked idlest; the policies see the larger
        # of the two counts (other routers' requests show up in the published load).
        self.placed: dict[str, int] = {}
        # Of those, the offline ones (priority > 0): an instance's scheduler runs online work
        # first and preempts offline work for it, so online placement looks past them.
        self.placed_offline: dict[str, int] = {}
        # Prompt block digests this router sent to each instance (most recent last, bounded):
        # cache-aware placement counts them as cached before the instance publishes them.
        self.routed: dict[str, OrderedDict[str, None]] = {}
        # Prefill/decode disaggregation: on when both roles are up (unless turned off).
        self.pd_enabled = pd
        # Role switches: instances being switched (no new placements) and roles this router has
        # switched and the registry may not show yet.
        self.switching: dict[str, Role] = {}
        self.role_overrides: dict[str, Role] = {}
        self.draining = False  # the router itself is shutting down
        self.in_flight = 0
        self.turn = itertools.count()
        self.metrics = RouterMetrics(self.statuses)
        self.client: httpx.AsyncClient | None = None

    # ---- membership ----------------------------------------------------------------------------

    def status(self, member: Member, now: float | None = None) -> Status:
        status = policies.member_status(member, self.drained, now)
        failed_at = self.unreachable.get(member.info.id)
        if status is Status.UP and failed_at is not None:
            if member.load is not None and member.load.updated_at > failed_at:
                del self.unreachable[member.info.id]  # it published since: back in service
            else:
                return Status.DEAD
        return status

    def statuses(self) -> list[tuple[Member, Status]]:
        now = time.time()
        return [(m, self.status(m, now)) for m in self.members]

    async def refresh(self) -> None:
        self._reads_started += 1
        read = self._reads_started
        members = sorted(await self.registry.members(), key=lambda m: m.info.id)
        if read < self._read_applied:
            return
        self._read_applied = read
        self.members = members
        live = {m.info.id for m in self.members}
        for gone in set(self.unreachable) - live:
            del self.unreachable[gone]
        for gone in set(self.routed) - live:  # a restarted instance starts with a cold cache
            del self.routed[gone]
        for m in self.members:  # the registry caught up with a switch this router made
            if self.role_overrides.get(m.info.id) is m.info.role:
                del self.role_overrides[m.info.id]
        if self.policy is PolicyName.CACHE_AWARE and self.tokenizer is None and self.tokenizer_path is None:
            self.tokenizer_path = default_tokenizer_path(self.members)
            if self.tokenizer_path is not None:
                asyncio.get_running_loop().run_in_executor(None, self.load_tokenizer)

    async def poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                logger.warning("reading the registry failed; keeping the last view", exc_info=True)
            await asyncio.sleep(POLL_INTERVAL_S)

    def load_tokenizer(self) -> None:
        if self.tokenizer_path is None or self.tokenizer is not None:
            return
        try:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            logger.info("tokenizer for cache-aware routing: %s", self.tokenizer_path)
        except Exception:
            logger.warning(
                "cannot load the tokenizer %s; placing by load only", self.tokenizer_path, exc_info=True
            )

    # ---- placement -----------------------------------------------------------------------------

    def pd_active(self) -> bool:
        """Whether requests are split: on, with a prefill and a decode instance up."""
        if not self.pd_enabled:
            return False
        roles = {self.role_of(m) for m in self.up_members()}
        return Role.PREFILL in roles and Role.DECODE in roles

    def role_of(self, member: Member) -> Role:
        return self.role_overrides.get(member.info.id, member.info.role)

    def up_members(self, exclude: set[str] = frozenset(), role: Role | None = None) -> list[Member]:
        """Members that may take new work (not drained, dead or switching roles), of `role`."""
        now = time.time()
        return [
            m
            for m in self.members
            if m.info.id not in exclude
            and m.info.id not in self.switching
            and self.status(m, now) is Status.UP
            and (role is None or self.role_of(m) is role)
        ]

    def candidates(
        self, model: str | None, exclude: set[str], offline: bool = False, role: Role | None = None
    ) -> list[Member]:
        """Where a request may go: members of `role`; with no role (a whole request), mixed
        instances while there are any, else decode instances (they prefill too), else any."""
        up = self.up_members(exclude, role)
        if role is None:
            up = (
                [m for m in up if self.role_of(m) is Role.MIXED]
                or [m for m in up if self.role_of(m) is Role.DECODE]
                or up
            )
        serving_model = [m for m in up if m.info.model == model]
        # A request naming a model nobody serves still goes somewhere: that instance answers the 404.
        return [self.with_placed(m, offline) for m in serving_model or up]

    def with_placed(self, member: Member, offline: bool = False) -> Member:
        """`member` with the load this router knows it has: for an offline request all of it,
        for an online one the load without this router's offline requests (which the
        instance preempts for online work)."""
        iid = member.info.id
        load = member.load or InstanceLoad(updated_at=time.time())
        published = load.num_requests_running + load.num_requests_waiting
        mine_offline = self.placed_offline.get(iid, 0)
        mine = self.placed.get(iid, 0)
        queue = max(published, mine) if offline else max(published - mine_offline, mine - mine_offline, 0)
        if queue == published:
            return member
        running = max(queue - load.num_requests_waiting, 0)
        return Member(
            member.info, replace(load, num_requests_running=running, num_requests_waiting=queue - running)
        )

    def place(self, instance_id: str, delta: int, offline: bool = False) -> None:
        self.placed[instance_id] = self.placed.get(instance_id, 0) + delta
        if offline:
            self.placed_offline[instance_id] = self.placed_offline.get(instance_id, 0) + delta

    def choose(
        self,
        members: list[Member],
        token_ids: list[int] | None,
        cache_salt: str | None,
        offline: bool = False,
    ) -> Member | None:
        if offline:
            # Offline work fills idle capacity: the instance with the most room, cache or not.
            return policies.least_loaded(members)
        if self.policy is PolicyName.ROUND_ROBIN:
            return policies.round_robin(members, next(self.turn))
        if self.policy is PolicyName.LEAST_LOADED:
            return policies.least_loaded(members)
        return policies.cache_aware(members, token_ids, cache_salt, self.limits, self.routed)

    def record_route(self, member: Member, token_ids: list[int] | None, cache_salt: str | None) -> None:
        if not token_ids or self.policy is not PolicyName.CACHE_AWARE:
            return
        routed = self.routed.setdefault(member.info.id, OrderedDict())
        for digest in policies.prompt_block_digests(token_ids, member.info.block_size, cache_salt):
            routed[digest] = None
            routed.move_to_end(digest)
        while len(routed) > MAX_ROUTED_DIGESTS:
            routed.popitem(last=False)

    def prompt_ids(self, body: RoutedRequest) -> list[int] | None:
        """The (first) prompt's token ids as the instance will see them, for cache-aware placement;
        None when they cannot be known here (no tokenizer): the instance validates the prompt."""
        if self.policy is not PolicyName.CACHE_AWARE:
            return None
        if isinstance(body, CompletionRequest):
            prompt: Any = body.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, list):
                return list(prompt)
            text, special = prompt, True
        elif isinstance(body, MessagesRequest):
            messages, text, special = body.chat_messages(), None, False
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text, special = None, False
        if self.tokenizer is None:
            return None
        try:
            if text is None:
                text = chat_prompt_text(self.tokenizer, messages)
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        except Exception:  # the instance reports a bad prompt; placement just loses the cache hint
            logger.debug("tokenizing for placement failed", exc_info=True)
            return None

    async def switch_role(
        self, instance_id: str, role: Role, by: str, drain_timeout_s: float = 60.0
    ) -> dict[str, Any]:
        member = next((m for m in self.members if m.info.id == instance_id), None)
        if member is None:
            raise OpenAIError(404, f"No instance {instance_id!r} is registered.", param="instance_id")
        old = self.role_of(member)
        if role is old:
            return {"id": instance_id, "role": role.value, "switched": False}
        if instance_id in self.switching:
            raise OpenAIError(409, f"Instance {instance_id!r} is already switching roles.", code="switching")
        assert self.client is not None
        self.switching[instance_id] = role
        try:
            deadline = time.monotonic() + drain_timeout_s
            while self.placed.get(instance_id, 0) > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # its in-flight work of the old role finishes first
            try:
                r = await self.client.post(
                    f"{member.info.url.rstrip('/')}/cluster/role", json={"role": role.value}, timeout=10
                )
            except httpx.HTTPError as exc:
                raise OpenAIError(
                    502, f"Instance {instance_id!r} is unreachable: {exc}", code="instance_unreachable"
                ) from exc
            if r.status_code != 200:
                raise OpenAIError(
                    502, f"Instance {instance_id!r} refused the role: {r.text[:200]}", code="role_refused"
                )
            self.role_overrides[instance_id] = role
            # The instance re-registered before it answered, and a poll may have caught it between
            # its two registrations (absent): read the registry again rather than wait for the next.
            with contextlib.suppress(Exception):
                await self.refresh()
        finally:
            del self.switching[instance_id]
        self.metrics.role_switches.labels(instance_id, old.value, role.value, by).inc()
        logger.info("instance %s switched from %s to %s (by %s)", instance_id, old.value, role.value, by)
        return {"id": instance_id, "role": role.value, "switched": True}

    async def drain(self, timeout_s: float) -> None:
        """SIGTERM (via `DrainingServer`): refuse new requests, let in-flight ones finish."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def default_tokenizer_path(members: Sequence[Member]) -> str | None:
    """The first member's model, when it names a checkpoint directory on this host."""
    if members and Path(members[0].info.model).is_dir():
        return members[0].info.model
    return None


class RouterMiddleware:
    """Counts in-flight /v1 requests for the drain, refuses them while draining, last-resort 500."""

    def __init__(self, app: ASGIApp, state: RouterState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.state.in_flight += 1
        try:
            if self.state.draining:
                refusal = OpenAIError(
                    503, "The router is shutting down and accepts no new requests.", code="draining"
                )
                await refusal.response()(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception:
            logger.exception("request %s failed", scope.get("path"))
            if not started:
                await internal_error().response()(scope, receive, send_wrapper)
        finally:
            self.state.in_flight -= 1


async def forward(state: RouterState, request: Request, body: RoutedRequest) -> Response:
    """Place the request and relay the chosen instance's answer; re-dispatch on failure: whole
    before anything was sent, resumed after the tokens sent when an OpenAI stream breaks (an
    Anthropic stream is relayed byte for byte and ends with an error event)."""
    raw = await request.body()
    payload = json.loads(raw)  # a JSON object: the body model validated it
    anthropic = isinstance(body, MessagesRequest)
    resume = not anthropic and failover.resumable(payload)
    progress = failover.StreamProgress(
        client_wants_ids=bool(payload.get("return_token_ids")), prior=payload.get("resume")
    )
    # The instance validates the request as the router did; a resumable stream also asks for the
    # token ids it would need to continue elsewhere.
    content = json.dumps(progress.resume_body(payload)).encode() if resume else raw
    upstream = Upstream(state, request, body)
    if state.policy is PolicyName.CACHE_AWARE and state.tokenizer is not None:
        # Templating and tokenizing a long prompt takes milliseconds: off the event loop.
        upstream.token_ids = await asyncio.to_thread(state.prompt_ids, body)
    try:
        if not anthropic:
            chat = isinstance(body, ChatCompletionRequest)
            split = await disagg.forward_pd(state, upstream, payload, progress, chat)
            if split is not None:
                return split
        placed = await upstream.place(content)
    except ClientGone:
        await upstream.close()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if placed is None:
        return await no_placement(state, upstream)
    resp, member = placed
    headers = {**passed_headers(resp), INSTANCE_HEADER: member.info.id}
    if not body.stream or resp.status_code != 200:
        upstream.count(member, -1)
        await upstream.close()
        return Response(resp.content, status_code=resp.status_code, headers=headers)
    relay = Relay(state, upstream, placed, payload if resume else None, progress, raw=anthropic)
    return StreamingResponse(
        relay.events(), status_code=200, headers=headers, background=BackgroundTask(relay.finish)
    )


async def no_placement(state: RouterState, upstream: Upstream) -> Response:
    last = upstream.last_unavailable
    if last is not None:  # every instance said 503: the client gets the last one's words
        state.metrics.failed.labels("unavailable").inc()
        response = Response(last.content, status_code=503, headers=passed_headers(last))
        await upstream.close()
        return response
    state.metrics.failed.labels("no_instance").inc()
    detail = "every instance tried was unreachable" if upstream.tried else "no instance is up"
    raise NoInstanceError(f"{detail}; retry shortly.")


def embedded_registry_router(registry: Registry) -> APIRouter | None:
    """The embedded registry's HTTP API (instances register through it), when `registry` is one."""
    try:
        module = importlib.import_module("xllm.cluster.embedded_registry")
    except ModuleNotFoundError:
        return None
    if not isinstance(registry, getattr(module, "EmbeddedRegistry", ())):
        return None
    return module.registry_api(registry)


def create_router_app(
    registry: Registry,
    policy: str | PolicyName = PolicyName.CACHE_AWARE,
    *,
    tokenizer_path: str | None = None,
    limits: policies.CacheAwareLimits | None = None,
    extra_routers: Sequence[APIRouter] = (),
    state: RouterState | None = None,
    close_registry: bool = False,
) -> FastAPI:
    """The router app; `extra_routers` are included as they are (each carries its own prefix).

    An `EmbeddedRegistry` gets its HTTP API mounted at /cluster/registry/. `close_registry`: the
    app owns the registry and closes it at shutdown.
    """
    state = state or RouterState(registry, PolicyName(policy), tokenizer_path, limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # No read timeout: a long generation streams for as long as it takes.
        state.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0), limits=httpx.Limits(max_connections=None)
        )
        if state.tokenizer_path is not None and state.policy is PolicyName.CACHE_AWARE:
            await asyncio.get_running_loop().run_in_executor(None, state.load_tokenizer)
        with contextlib.suppress(Exception):
            await state.refresh()
        tasks = [asyncio.create_task(state.poll())]
        if state.slo is not None:
            tasks.append(asyncio.create_task(state.slo.run(state)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.client.aclose()
            if close_registry:
                await registry.close()

    app = FastAPI(title="xllm cluster router", version=__version__, lifespan=lifespan)
    app.state.router = state
    install_error_handlers(app)
    app.add_middleware(RouterMiddleware, state=state)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.draining:
            return OpenAIError(503, "The router is shutting down.", code="draining").response()
        up = sum(status is Status.UP for _, status in state.statuses())
        if not up:
            return NoInstanceError("no instance is up").response()
        return JSONResponse({"status": "ok", "instances_up": up})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        names = sorted({m.info.model for m, status in state.statuses() if status is Status.UP})
        return ModelList(data=[ModelCard(id=name) for name in names])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await forward(state, request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await forward(state, request, body)

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def model(model_id: str) -> ModelCard:
        if not any(m.info.model == model_id for m, status in state.statuses() if status is Status.UP):
            raise OpenAIError(
                404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found"
            )
        return ModelCard(id=model_id)

    anthropic = APIRouter(route_class=AnthropicRoute)  # its errors leave in Anthropic's shape

    @anthropic.post(MESSAGES_PATH)
    async def messages(body: MessagesRequest, request: Request) -> Response:
        return await forward(state, request, body)

    app.include_router(anthropic)

    @app.get("/cluster/instances")
    async def instances() -> list[dict[str, Any]]:
        return [
            {
                "id": m.info.id,
                "role": state.role_of(m).value,
                "url": m.info.url,
                "model": m.info.model,
                "status": "switching" if m.info.id in state.switching else status.value,
                "num_requests_running": 0 if m.load is None else m.load.num_requests_running,
                "num_requests_waiting": 0 if m.load is None else m.load.num_requests_waiting,
                "kv_cache_usage": 0.0 if m.load is None else m.load.kv_cache_usage,
                "kv_transfers_sent": 0 if m.load is None else m.load.kv_transfers_sent,
                "kv_transfers_received": 0 if m.load is None else m.load.kv_transfers_received,
                "kv_transfer_bytes_sent": 0 if m.load is None else m.load.kv_transfer_bytes_sent,
                "kv_transfer_bytes_received": 0 if m.load is None else m.load.kv_transfer_bytes_received,
                "pid": m.info.pid,
            }
            for m, status in state.statuses()
        ]

    @app.get("/cluster/policy")
    async def get_policy() -> dict[str, str]:
        return {"policy": state.policy.value}

    @app.put("/cluster/policy")
    async def set_policy(body: PolicyChange) -> dict[str, str]:
        """Switches the placement policy of this router (benchmarks compare policies this way)."""
        state.policy = body.policy
        if state.policy is PolicyName.CACHE_AWARE and state.tokenizer is None:
            state.tokenizer_path = state.tokenizer_path or default_tokenizer_path(state.members)
            await asyncio.to_thread(state.load_tokenizer)
        logger.info("placement policy now %s", state.policy.value)
        return {"policy": state.policy.value}

    @app.post("/cluster/instances/{instance_id}/role")
    async def switch_role(instance_id: str, body: RoleSwitch) -> dict[str, Any]:
        """Switches an instance between prefill, decode and mixed without a restart: no new
        placements on it, its in-flight work (placed by this router) finishes, then it takes
        the new role. Answers once the switch is done."""
        return await state.switch_role(
            instance_id, body.role, by="admin", drain_timeout_s=body.drain_timeout_s
        )

    @app.post("/cluster/instances/{instance_id}/drain")
    async def drain(instance_id: str) -> dict[str, Any]:
        if instance_id not in {m.info.id for m in state.members}:
            raise OpenAIError(404, f"No instance {instance_id!r} is registered.", param="instance_id")
        state.drained.add(instance_id)
        logger.info("instance %s drained: no new placements", instance_id)
        return {"id": instance_id, "status": Status.DRAINING.value}

    embedded = embedded_registry_router(registry)
    if embedded is not None:  # it carries its prefix, /cluster/registry
        app.include_router(embedded)
    for extra in extra_routers:
        app.include_router(extra)
    return app

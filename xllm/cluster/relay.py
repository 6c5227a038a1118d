"""Relaying one request to instances: placing it (and placing it again after a failure) and
passing the instance's answer on to the client.

`Upstream` places a request: the best instance not tried yet (of a role, by the router's policy
or a given choice), counting it in the router's placements, marking instances that cannot be
reached dead, and remembering the last 503. `Relay` passes an event stream on: chunk by chunk,
through `failover.StreamProgress`, and when the instance dies mid-stream it places the rest of the
stream elsewhere with `resume` (see `xllm.cluster.failover`); Anthropic streams go byte for byte.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import Request

from xllm.cluster import failover
from xllm.cluster.registry import Member, Role
from xllm.service.anthropic_errors import anthropic_error_event
from xllm.service.anthropic_protocol import MessagesRequest
from xllm.service.app import until_disconnected
from xllm.service.errors import OpenAIError
from xllm.service.protocol import ChatCompletionRequest, CompletionRequest
from xllm.service.serving import PRIORITY_HEADER, request_priority

if TYPE_CHECKING:
    from xllm.cluster.router import RouterState

logger = logging.getLogger("xllm.cluster")

RoutedRequest = CompletionRequest | ChatCompletionRequest | MessagesRequest

# Headers of an instance's response that reach the client (hop-by-hop ones and the length, which
# the router's own framing sets, do not).
PASSED_RESPONSE_HEADERS = ("content-type", "x-request-id", "retry-after", "cache-control", "www-authenticate")
PASSED_REQUEST_HEADERS = ("authorization", "content-type", "x-api-key", "accept", "x-priority")
INSTANCE_HEADER = "x-xllm-instance"  # which instance served the request: the recorded path


class Upstream:
    """Places a request on instances: the first placement and every re-dispatch after a failure."""

    def __init__(self, state: RouterState, request: Request, body: RoutedRequest):
        self.state = state
        self.request = request
        self.body = body
        self.headers = {k: v for k, v in request.headers.items() if k.lower() in PASSED_REQUEST_HEADERS}
        self.token_ids: list[int] | None = None  # the prompt's, for cache-aware placement
        self.arrived = time.monotonic()
        # Anthropic's API has no priority: its requests are online.
        priority = (
            0
            if isinstance(body, MessagesRequest)
            else request_priority(body, request.headers.get(PRIORITY_HEADER))
        )
        self.offline = priority > 0
        self.tried: set[str] = set()
        self.failed_on: str | None = None  # the instance whose placement is being retried
        self.last_unavailable: httpx.Response | None = None

    async def place(
        self,
        content: bytes,
        role: Role | None = None,
        choose: Callable[[list[Member]], Member | None] | None = None,
        stream: bool | None = None,
    ) -> tuple[httpx.Response, Member] | None:
        """Sends `content` to the best instance (of `role`, picked by `choose` or the router's
        policy) not tried yet; returns its (non-503) response, or None when none is left
        (`last_unavailable` keeps the last 503). `stream`: whether the answer is an event
        stream (default: as the client asked). Raises `ClientGone`."""
        state = self.state
        assert state.client is not None, "the router's lifespan creates the HTTP client"
        streamed = bool(self.body.stream) if stream is None else stream
        while True:
            salt = getattr(self.body, "cache_salt", None)
            candidates = state.candidates(self.body.model, self.tried, self.offline, role)
            if choose is not None:
                member = choose(candidates)
            else:
                member = state.choose(candidates, self.token_ids, salt, self.offline)
            if member is None:
                return None
            if self.failed_on is not None:
                state.metrics.redispatched.labels(self.failed_on).inc()
            self.tried.add(member.info.id)
            self.count(member, 1)
            state.record_route(member, self.token_ids, salt)
            url = member.info.url.rstrip("/") + self.request.url.path
            upstream = state.client.build_request("POST", url, content=content, headers=self.headers)
            try:
                # A client that leaves while the instance works (a whole response comes only at
                # the end) cancels the upstream request, and the closed connection aborts it there.
                resp = await until_disconnected(self.request, self.send(upstream, streamed))
            except httpx.TransportError as exc:
                logger.warning(
                    "instance %s unreachable (%s); re-dispatching", member.info.id, type(exc).__name__
                )
                self.count(member, -1)
                self.lost(member)
                continue
            if resp is None:
                self.count(member, -1)
                raise ClientGone
            if resp.status_code == 503:  # loading, draining or engine dead: someone else may serve it
                if self.last_unavailable is not None:
                    await self.last_unavailable.aclose()
                await resp.aread()
                self.last_unavailable = resp
                self.count(member, -1)
                self.failed_on = member.info.id
                continue
            state.metrics.routed.labels(member.info.id).inc()
            # The request's path (a re-dispatch shows as a later line with attempt > 1).
            logger.info(
                "%s %s -> %s (policy %s, attempt %d)",
                resp.headers.get("x-request-id", "-"),  # the instance's id, as in its access log
                self.request.url.path,
                member.info.id,
                state.policy.value,
                len(self.tried),
            )
            return resp, member

    async def send(self, upstream: httpx.Request, streamed: bool) -> httpx.Response:
        assert self.state.client is not None
        resp = await self.state.client.send(upstream, stream=True)
        if resp.status_code != 503 and (not streamed or resp.status_code != 200):
            # A whole answer is read here, so that an instance dying before its end is one
            # more unreachable instance, and the request goes elsewhere untouched.
            try:
                await resp.aread()
            finally:
                await resp.aclose()
        return resp

    def count(self, member: Member, delta: int) -> None:
        """Counts (+1) or uncounts (-1) this request among `member`'s placements."""
        self.state.place(member.info.id, delta, self.offline)

    def lost(self, member: Member) -> None:
        """`member` failed under a request: dead to placement until it publishes again."""
        self.state.unreachable[member.info.id] = time.time()
        self.failed_on = member.info.id

    async def close(self) -> None:
        if self.last_unavailable is not None:
            await self.last_unavailable.aclose()


class ClientGone(Exception):
    """The client disconnected while the request was being placed."""


def passed_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() in PASSED_RESPONSE_HEADERS}


class Relay:
    """The instance's event stream as the client's; when the instance dies mid-stream, the rest
    of the stream from another instance, resumed after what was sent (`payload` None: a stream
    that cannot be resumed ends with an error event)."""

    def __init__(
        self,
        state: RouterState,
        upstream: Upstream,
        placed: tuple[httpx.Response, Member],
        payload: dict[str, Any] | None,
        progress: failover.StreamProgress,
        raw: bool = False,
        head: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.head = list(head)  # events the router sends before the instance's (a PD chat role chunk)
        self.raw = raw  # bytes as they come, no resume (Anthropic's events carry no token ids)
        self.state = state
        self.upstream = upstream
        self.resp, self.member = placed
        self.payload = payload
        self.progress = progress
        self.open = True  # `resp` is open and counted in the router's placements

    async def finish(self) -> None:
        """Closes the current upstream response; runs from the stream's end and from the
        response's background task, whichever comes first (a client that disconnects may skip
        either one)."""
        if self.open:
            self.open = False
            self.upstream.count(self.member, -1)
            await self.resp.aclose()
        await self.upstream.close()

    async def events(self) -> AsyncIterator[bytes]:
        if self.raw:
            async for chunk in self.raw_events():
                yield chunk
            return
        for event in self.head:
            rewritten = self.progress.rewrite(event)
            if rewritten is not None:
                yield failover.sse_event(rewritten)
        first_token_at: float | None = None
        try:
            while True:
                broke = "closed without [DONE]"
                try:
                    async for data in failover.sse_payloads(self.resp.aiter_bytes()):
                        if data == "[DONE]":
                            self.observe(first_token_at)
                            yield failover.sse_event(data)
                            return
                        try:
                            event = json.loads(data)
                        except ValueError:
                            yield failover.sse_event(data)
                            continue
                        if failover.is_engine_dead(event):
                            broke = "its engine died"
                            break
                        rewritten = self.progress.rewrite(event)
                        if first_token_at is None and self.progress.text_chars:
                            first_token_at = time.monotonic()
                        if rewritten is not None:
                            yield failover.sse_event(rewritten)
                except httpx.TransportError as exc:
                    broke = type(exc).__name__
                failed = self.member
                logger.warning(
                    "instance %s broke off a stream (%s) after %d tokens",
                    failed.info.id,
                    broke,
                    len(self.progress.token_ids),
                )
                await self.finish()
                self.upstream.lost(failed)
                why = await self.resume()
                if why is not None:
                    self.state.metrics.failed.labels("broken_stream").inc()
                    yield failover.sse_event(instance_failed(failed, why))
                    yield failover.sse_event("[DONE]")
                    return
                self.state.metrics.resumed.labels(failed.info.id).inc()
                logger.info(
                    "stream resumed on %s after %d tokens", self.member.info.id, len(self.progress.token_ids)
                )
        finally:
            await self.finish()

    def observe(self, first_token_at: float | None) -> None:
        """A finished stream's TTFT and TPOT, as the router saw them, for the slo balancer."""
        slo = self.state.slo
        if slo is None or first_token_at is None:
            return
        tokens = len(self.progress.token_ids) + len((self.progress.prior or {}).get("token_ids", []))
        tpot = (time.monotonic() - first_token_at) / (tokens - 1) if tokens > 1 else None
        slo.observe(first_token_at - self.upstream.arrived, tpot)

    async def raw_events(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.resp.aiter_raw():
                yield chunk
        except httpx.TransportError:
            logger.warning("instance %s broke off a stream", self.member.info.id)
            self.upstream.lost(self.member)
            self.state.metrics.failed.labels("broken_stream").inc()
            why = OpenAIError(
                503,
                f"Instance {self.member.info.id} failed mid-stream; retry the request.",
                code="instance_failed",
            )
            yield anthropic_error_event(why).encode()
        finally:
            await self.finish()

    async def resume(self) -> str | None:
        """Places the rest of the stream; returns why it could not be, or None."""
        if self.payload is None:
            return "this request cannot be resumed (n > 1, several prompts or echo)"
        try:
            placed = await self.upstream.place(json.dumps(self.progress.resume_body(self.payload)).encode())
        except ClientGone:
            return "the client left"
        if placed is None:
            return "no other instance could continue it"
        resp, member = placed
        if resp.status_code != 200:
            self.upstream.count(member, -1)
            logger.warning("instance %s refused the resumed stream: %s", member.info.id, resp.text[:200])
            return f"instance {member.info.id} refused to continue it"
        self.resp, self.member, self.open = resp, member, True
        return None


def instance_failed(member: Member, why: str) -> dict[str, Any]:
    return OpenAIError(
        503,
        f"Instance {member.info.id} failed mid-stream and {why}; retry the request.",
        code="instance_failed",
    ).body()

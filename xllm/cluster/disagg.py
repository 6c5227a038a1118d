"""Prefill/decode disaggregation in the router: one request, two instances, one answer.

When the cluster has prefill and decode instances (and the router's ``--pd`` is on), an eligible
request goes first to a prefill instance, chosen by the router's policy (cache-aware placement
pays most there), as a whole one-token request with ``kv_transfer_params: {do_remote_decode}``:
it computes the prompt, samples the first token and holds the prompt's KV. Then the same request
goes to the decode instance with the most room, with the first token as ``resume`` and
``kv_transfer_params: {do_remote_prefill, remote_url, transfer_id}``: it fetches the KV from the
prefill instance through the HAL's transfer engine and decodes the rest, and its answer (a stream
or a whole one, starting with the first token's text) is the client's. The client sees one
ordinary answer; the response headers and the router's metrics say which two instances served it.

What is not eligible (n > 1, several prompts, echo, logprobs, a one-token request) is served whole
by one instance, as is everything when no prefill (or no decode) instance is up, or when the
prefill instance fails: a fallback, logged and counted. A decode instance that dies mid-stream is
replaced as in any failover (the rest is prefilled again elsewhere).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from xllm.cluster import failover, policies
from xllm.cluster.registry import Role
from xllm.cluster.relay import INSTANCE_HEADER, Relay, Upstream, passed_headers

if TYPE_CHECKING:
    from xllm.cluster.router import RouterState

logger = logging.getLogger("xllm.cluster")

PREFILL_HEADER = "x-xllm-prefill-instance"  # with x-xllm-instance (the decode one): the request's path


def eligible(payload: dict[str, Any]) -> bool:
    """Whether a request can be split into a prefill part and a decode part."""
    prompt = payload.get("prompt")
    several_prompts = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return (
        payload.get("n", 1) in (1, None)
        and not several_prompts
        and not payload.get("echo")
        and not payload.get("logprobs")  # the first token's logprobs would be the prefill's alone
        and payload.get("kv_transfer_params") is None
        and payload.get("resume") is None
        and max_tokens != 1
    )


def prefill_request(payload: dict[str, Any]) -> dict[str, Any]:
    """The prefill part: the same request, whole, for one token, its prompt KV held."""
    body = dict(payload, stream=False, return_token_ids=True, kv_transfer_params={"do_remote_decode": True})
    body.pop("stream_options", None)
    if body.get("max_completion_tokens") is not None:
        body["max_completion_tokens"] = 1
    else:
        body["max_tokens"] = 1
    # Before min_tokens the first token cannot be EOS: the same ban as in the whole request.
    body["min_tokens"] = min(int(payload.get("min_tokens") or 0), 1)
    return body


def decode_request(
    payload: dict[str, Any], first_ids: list[int], prefill_url: str, transfer_id: str
) -> dict[str, Any]:
    return dict(
        payload,
        return_token_ids=True,
        resume={"token_ids": first_ids, "text_offset": 0},
        kv_transfer_params={"do_remote_prefill": True, "remote_url": prefill_url, "transfer_id": transfer_id},
    )


def client_view(answer: dict[str, Any], wants_ids: bool) -> dict[str, Any]:
    """An instance's whole answer without what the router asked for and the client did not."""
    answer.pop("kv_transfer_params", None)
    if not wants_ids:
        answer.pop("prompt_token_ids", None)
        for choice in answer.get("choices") or []:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
    return answer


def stream_of(answer: dict[str, Any], chat: bool, include_usage: bool) -> list[bytes]:
    """A whole answer (one that ended at its first token) as the event stream the client asked for."""
    chunk_object = "chat.completion.chunk" if chat else "text_completion"
    head = {
        "id": answer["id"],
        "object": chunk_object,
        "created": answer["created"],
        "model": answer["model"],
    }
    events: list[dict[str, Any]] = []
    for choice in answer["choices"]:
        if chat:
            message = choice.get("message") or {}
            events.append(
                {
                    **head,
                    "choices": [{"index": choice["index"], "delta": {"role": "assistant", "content": ""}}],
                }
            )
            part = {"index": choice["index"], "delta": {"content": message.get("content") or ""}}
        else:
            part = {"index": choice["index"], "text": choice.get("text", "")}
        part["finish_reason"] = choice.get("finish_reason")
        events.append({**head, "choices": [part]})
    if include_usage and answer.get("usage") is not None:
        events.append({**head, "choices": [], "usage": answer["usage"]})
    return [failover.sse_event(e) for e in events] + [failover.sse_event("[DONE]")]


def role_chunk(answer: dict[str, Any]) -> dict[str, Any]:
    """The chat stream's opening role chunk (the resumed decode stream does not send one)."""
    return {
        "id": answer["id"],
        "object": "chat.completion.chunk",
        "created": answer["created"],
        "model": answer["model"],
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }


async def forward_pd(
    state: RouterState,
    upstream: Upstream,
    payload: dict[str, Any],
    progress: failover.StreamProgress,
    chat: bool,
) -> Response | None:
    """Serves the request prefill-then-decode; None when it is to be served whole instead."""
    if not (state.pd_active() and eligible(payload)):
        return None
    placed = await upstream.place(
        json.dumps(prefill_request(payload)).encode(), role=Role.PREFILL, stream=False
    )
    if placed is None:
        return fallback(state, upstream, "no prefill instance could take it")
    resp, prefill = placed
    upstream.count(prefill, -1)
    # It answered: should the decode part find no instance, it may still serve the request whole.
    upstream.tried.discard(prefill.info.id)
    if resp.status_code != 200:
        if 400 <= resp.status_code < 500:  # the request's own fault: every instance would say so
            return Response(resp.content, status_code=resp.status_code, headers=passed_headers(resp))
        return fallback(state, upstream, f"prefill instance {prefill.info.id} answered {resp.status_code}")
    answer = resp.json()
    choice = answer["choices"][0]
    first_ids = list(choice.get("token_ids") or [])
    kv = answer.get("kv_transfer_params") or {}
    headers = {PREFILL_HEADER: prefill.info.id, "content-type": "application/json"}
    if choice.get("finish_reason") != "length" or not first_ids or "transfer_id" not in kv:
        # It ended at its first token (EOS, a stop): that is the whole answer.
        state.metrics.pd_requests.labels(prefill.info.id, "-").inc()
        answer = client_view(answer, progress.client_wants_ids)
        if payload.get("stream"):
            include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
            body = b"".join(stream_of(answer, chat, include_usage))
            return Response(
                body,
                headers={**headers, INSTANCE_HEADER: prefill.info.id, "content-type": "text/event-stream"},
            )
        return Response(json.dumps(answer), headers={**headers, INSTANCE_HEADER: prefill.info.id})
    decode_body = decode_request(payload, first_ids, prefill.info.url, kv["transfer_id"])
    placed = await upstream.place(
        json.dumps(decode_body).encode(), role=Role.DECODE, choose=policies.least_loaded
    )
    if placed is None:  # the prefill's hold expires by itself
        return fallback(state, upstream, "no decode instance could take it")
    # Only now is the first token part of the client's stream: a fallback streams it again.
    progress.prior = {"token_ids": first_ids, "text_offset": 0}
    progress.lead_ids = list(first_ids)
    resp, decode = placed
    state.metrics.pd_requests.labels(prefill.info.id, decode.info.id).inc()
    logger.info("%s -> prefill %s, decode %s", upstream.request.url.path, prefill.info.id, decode.info.id)
    headers = {**passed_headers(resp), INSTANCE_HEADER: decode.info.id, PREFILL_HEADER: prefill.info.id}
    if not payload.get("stream") or resp.status_code != 200:
        upstream.count(decode, -1)
        await upstream.close()
        if resp.status_code != 200:
            return Response(resp.content, status_code=resp.status_code, headers=headers)
        whole = client_view(resp.json(), progress.client_wants_ids)
        if progress.client_wants_ids:  # the decode side reports what came after the first token
            choice = whole["choices"][0]
            choice["token_ids"] = first_ids + list(choice.get("token_ids") or [])
        return Response(json.dumps(whole), headers={**headers, "content-type": "application/json"})
    head = [role_chunk(answer)] if chat else []
    relay = Relay(state, upstream, placed, payload, progress, head=head)
    return StreamingResponse(
        relay.events(), status_code=200, headers=headers, background=BackgroundTask(relay.finish)
    )


def fallback(state: RouterState, upstream: Upstream, why: str) -> None:
    """Serve the request whole (by a decode or mixed instance); logged and counted."""
    logger.warning("prefill/decode split not possible (%s); serving the request whole", why)
    state.metrics.pd_fallbacks.inc()
    return None

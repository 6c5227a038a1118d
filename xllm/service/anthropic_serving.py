"""Anthropic's Messages API over the same engine: request -> prompt -> engine -> message or events.

`MessagesServing` borrows the OpenAI `Serving`'s plumbing (chat template, context-length and
queue checks, sampling defaults, `EngineRun`, usage metrics) so that a conversation gets the same
prompt, the same limits and the same sampled text on either API; only the edges differ. The
engine's finish reasons become Anthropic's: "length" -> max_tokens, "stop" on a stop string ->
stop_sequence (naming the string), any other "stop" (EOS, stop token) -> end_turn. A stream is
Anthropic's event sequence: message_start, content_block_start, ping, content_block_delta...,
content_block_stop, message_delta (stop reason, output tokens), message_stop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from xllm.service.anthropic_errors import anthropic_error_event
from xllm.service.anthropic_protocol import (
    MessagesRequest,
    MessagesResponse,
    StopReason,
    TextBlock,
    Usage,
)
from xllm.service.engine_client import EngineRun, SubRequest
from xllm.service.errors import OpenAIError, internal_error
from xllm.service.serving import RequestContext, Serving

logger = logging.getLogger("xllm.service")


def event(name: str, data: dict[str, Any]) -> str:
    """One Anthropic server-sent event: its name on the `event:` line, its JSON on `data:`."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def message_id(ctx: RequestContext) -> str:
    # Anthropic's ids read "msg_<id>"; reusing the request id's hex ties the message to the access log.
    return "msg_" + ctx.request_id.rpartition("-")[2]


def stop_reason(output: Any) -> tuple[StopReason, str | None]:
    """(stop_reason, stop_sequence) of a finished engine `CompletionOutput`."""
    if output.finish_reason == "length":
        return "max_tokens", None
    if output.finish_reason == "stop":
        if isinstance(output.stop_reason, str):  # the engine names the stop string that matched
            return "stop_sequence", output.stop_reason
        return "end_turn", None
    # "abort": the server gave up on it (the drain deadline); the text is cut short, so say so.
    raise OpenAIError(503, "The request was aborted before it finished; retry it.", code="aborted")


class MessagesServing:
    """POST /v1/messages over the engine of one `Serving`."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def create(
        self, req: MessagesRequest, ctx: RequestContext
    ) -> MessagesResponse | AsyncIterator[str]:
        s = self.serving
        s.check_model(req.model)
        text, ids = s.templated_prompt(req.chat_messages())
        max_tokens = s._max_tokens(req.max_tokens, len(ids), "messages", "max_tokens")
        s.check_queue()
        ctx.prompt_tokens = len(ids)
        subs = s._sub_requests(ctx.request_id, [(text, ids)], req.sampling_fields(), [max_tokens], None, None)
        run = EngineRun(s.engine, subs, s.active_ids, s.admission)
        outputs = run.outputs()
        # Awaited before answering, so that an engine refusal is still an HTTP error status.
        first = await s._first(outputs, run)
        if req.stream:
            return self._stream(ctx, subs, outputs, first)
        try:
            await s._drain(outputs, first, ctx)
        finally:
            await outputs.aclose()
        s._finish(ctx, subs)
        output = self._output(subs)
        reason, sequence = stop_reason(output)
        return MessagesResponse(
            id=message_id(ctx),
            model=s.served_model_name,
            content=[TextBlock(text=output.text)],
            stop_reason=reason,
            stop_sequence=sequence,
            usage=Usage(input_tokens=ctx.prompt_tokens, output_tokens=ctx.completion_tokens),
        )

    @staticmethod
    def _output(subs: list[SubRequest]) -> Any:
        last = subs[0].last
        if last is None or not last.outputs:
            raise RuntimeError(f"engine request {subs[0].engine_request_id} ended without an output")
        return last.outputs[0]

    async def _stream(
        self,
        ctx: RequestContext,
        subs: list[SubRequest],
        outputs: AsyncIterator[tuple[SubRequest, Any]],
        first: tuple[SubRequest, Any] | None,
    ) -> AsyncIterator[str]:
        """The SSE body; a failure mid-stream becomes an ``error`` event (never a stack trace), and
        the engine stream is always closed, aborting what is unfinished (e.g. on a disconnect)."""
        s = self.serving
        start = MessagesResponse(
            id=message_id(ctx),
            model=s.served_model_name,
            content=[],
            usage=Usage(input_tokens=ctx.prompt_tokens, output_tokens=0),
        )
        try:
            yield event("message_start", {"type": "message_start", "message": start.model_dump(mode="json")})
            yield event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            yield event("ping", {"type": "ping"})
            sent = 0  # characters of the cumulative text already sent
            async for _, out in s._with_first(outputs, first):
                s._note_progress(ctx, out)
                text = out.outputs[0].text
                if len(text) > sent:
                    delta = {"type": "text_delta", "text": text[sent:]}
                    sent = len(text)
                    yield event(
                        "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
                    )
            s._finish(ctx, subs)
            reason, sequence = stop_reason(self._output(subs))
            yield event("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": {"output_tokens": ctx.completion_tokens},
                },
            )
            yield event("message_stop", {"type": "message_stop"})
        except OpenAIError as exc:
            yield anthropic_error_event(exc)
        except Exception:
            logger.exception("request %s failed mid-stream", ctx.request_id)
            yield anthropic_error_event(internal_error())
        finally:
            await outputs.aclose()

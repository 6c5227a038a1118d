"""Anthropic's Messages API over the same engine: request -> prompt -> engine -> message or events.

`MessagesServing` borrows the OpenAI `Serving`'s plumbing (chat template, context-length and
queue checks, sampling defaults, the engine run and its `ChoiceDeltas`, the SSE framing, usage
metrics) so that a conversation gets the same prompt, the same limits and the same sampled text
on either API; only the rendering differs. The engine's finish reasons become Anthropic's:
"length" -> max_tokens, "stop" on a stop string -> stop_sequence (naming the string), any other
"stop" (EOS, stop token) -> end_turn. A stream is Anthropic's event sequence: message_start,
content_block_start, ping, a content_block_delta per delta with text, content_block_stop,
message_delta (stop reason, output tokens), message_stop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from xllm.engine.outputs import CompletionOutput
from xllm.service.anthropic_errors import anthropic_error_event
from xllm.service.anthropic_protocol import (
    MessagesRequest,
    MessagesResponse,
    StopReason,
    TextBlock,
    Usage,
)
from xllm.service.deltas import ChoiceDelta, ChoiceDeltas
from xllm.service.errors import OpenAIError
from xllm.service.serving import RequestContext, Serving


def event(name: str, data: dict[str, Any]) -> str:
    """One Anthropic server-sent event: its name on the `event:` line, its JSON on `data:`."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def message_id(ctx: RequestContext) -> str:
    # Anthropic's ids read "msg_<id>"; reusing the request id's hex ties the message to the access log.
    return "msg_" + ctx.request_id.rpartition("-")[2]


def stop_reason(output: CompletionOutput | ChoiceDelta) -> tuple[StopReason, str | None]:
    """(stop_reason, stop_sequence) of a finished engine output (or a choice's last delta)."""
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
        max_tokens = s.checked_max_tokens(req.max_tokens, len(ids), "messages", "max_tokens")
        s.check_queue()
        ctx.prompt_tokens = len(ids)
        # Awaited before answering, so that an engine refusal is still an HTTP error status.
        deltas = await s.start(
            s.sub_requests(ctx.request_id, [(text, ids)], req.sampling_fields(), [max_tokens])
        )
        if req.stream:

            def tail() -> list[str]:
                reason, sequence = stop_reason(deltas.final_output(0))
                return [
                    event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                    event(
                        "message_delta",
                        {
                            "type": "message_delta",
                            "delta": {"stop_reason": reason, "stop_sequence": sequence},
                            "usage": {"output_tokens": ctx.completion_tokens},
                        },
                    ),
                    event("message_stop", {"type": "message_stop"}),
                ]

            return s.framed_stream(
                ctx, deltas, self._events(ctx, deltas), tail, error_event=anthropic_error_event, done=None
            )
        (whole,) = await s.whole(ctx, deltas)
        reason, sequence = stop_reason(whole)
        return MessagesResponse(
            id=message_id(ctx),
            model=s.served_model_name,
            content=[TextBlock(text=whole.text)],
            stop_reason=reason,
            stop_sequence=sequence,
            usage=Usage(input_tokens=ctx.prompt_tokens, output_tokens=ctx.completion_tokens),
        )

    async def _events(self, ctx: RequestContext, deltas: ChoiceDeltas) -> AsyncIterator[str]:
        """The stream up to its closing events: the message and its one text block opened, then
        a text delta per delta that has text."""
        start = MessagesResponse(
            id=message_id(ctx),
            model=self.serving.served_model_name,
            content=[],
            usage=Usage(input_tokens=ctx.prompt_tokens, output_tokens=0),
        )
        yield event("message_start", {"type": "message_start", "message": start.model_dump(mode="json")})
        yield event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        yield event("ping", {"type": "ping"})
        async for d in deltas:
            if d.text:
                delta = {"type": "text_delta", "text": d.text}
                yield event(
                    "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
                )

"""What the router needs to continue a broken stream on another instance, with nothing lost.

The router asks every instance for `return_token_ids` on streams it may have to resume, so each
chunk says which output tokens its text covers. `StreamProgress` reads the chunks on their way to
the client: it records the token ids and the characters of text sent, keeps the first instance's
chunk id and creation time on every later chunk, and strips the token ids again when the client
did not ask for them. When the instance dies (connection lost, the stream ends without
``[DONE]``, or it reports its engine dead), `resume_body` is the same request with
``resume: {token_ids, text_offset}``: the next instance prefills prompt + those tokens and
streams only what follows, so the client sees one stream with no duplicate and no missing token
(greedy and seeded sampling continue exactly; see `LLMEngine._resumed_ids`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

ENGINE_DEAD_CODE = "engine_dead"  # an instance whose engine died: its requests belong elsewhere


def resumable(body: dict[str, Any]) -> bool:
    """Whether a stream of this request can be resumed: one prompt, one choice, no echo (an
    echoed prompt's text would be counted as output)."""
    prompt = body.get("prompt")
    several_prompts = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    return (
        bool(body.get("stream"))
        and body.get("n", 1) in (1, None)
        and not several_prompts
        and not body.get("echo")
    )


@dataclass(slots=True)
class StreamProgress:
    """The part of one choice's stream the client has received."""

    client_wants_ids: bool  # the client itself asked for return_token_ids
    prior: dict[str, Any] | None = None  # a resume the client sent us (a router in front of one)
    token_ids: list[int] = field(default_factory=list)
    text_chars: int = 0
    chunk_id: str | None = None
    created: int | None = None
    role_sent: bool = False
    # Token ids the client has not seen though their text comes in the next chunk (a decode
    # instance's stream starts with the prefill's token): put in front of that chunk's ids.
    lead_ids: list[int] = field(default_factory=list)

    def rewrite(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Records a chunk and returns it as the client gets it (None: drop it)."""
        if self.chunk_id is None:
            self.chunk_id, self.created = event.get("id"), event.get("created")
        elif "id" in event:
            event["id"], event["created"] = self.chunk_id, self.created
        choices = event.get("choices") or []
        for choice in choices:
            delta = choice.get("delta")
            if delta is not None and delta.get("role") and not delta.get("content"):
                if self.role_sent:  # a re-dispatched chat stream announces the role again
                    choice["_drop"] = True
                    continue
                self.role_sent = True
            text = choice.get("text") if delta is None else delta.get("content")
            self.text_chars += len(text or "")
            self.token_ids += choice.get("token_ids") or []
            if self.lead_ids and self.client_wants_ids and "token_ids" in choice:
                choice["token_ids"] = self.lead_ids + choice["token_ids"]
                self.lead_ids = []
            if not self.client_wants_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
        if choices:
            event["choices"] = [c for c in choices if not c.pop("_drop", False)]
            if not event["choices"]:
                return None
        if not self.client_wants_ids:
            event.pop("prompt_token_ids", None)
        return event

    def resume_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request to send the next instance."""
        out = dict(body, return_token_ids=True)
        out.pop("resume", None)
        token_ids = list(self.prior["token_ids"]) if self.prior else []
        offset = int(self.prior.get("text_offset", 0)) if self.prior else 0
        token_ids += self.token_ids
        if token_ids:
            out["resume"] = {"token_ids": token_ids, "text_offset": offset + self.text_chars}
        return out


def is_engine_dead(event: dict[str, Any]) -> bool:
    error = event.get("error")
    return isinstance(error, dict) and error.get("code") == ENGINE_DEAD_CODE


async def sse_payloads(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The ``data:`` payloads of a server-sent-event byte stream, one per event."""
    buffer = b""
    data: list[str] = []
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()

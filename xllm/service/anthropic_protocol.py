"""Pydantic models of Anthropic's Messages API (``POST /v1/messages``) as far as xllm serves it.

Requests follow Anthropic's field names and ranges (`max_tokens` required, `temperature` in
[0, 1], `system` outside the message list, `stop_sequences`), so that the official `anthropic`
client works unchanged. Only text is served: a content block of any other type (image, tool_use,
document ...) is refused here, at the edge, with a 400 that names it, rather than dropped, since
answering without it would mislead the client. Unknown top-level fields (`tools`, `thinking` ...)
are ignored, as the OpenAI models do. Responses, stream events and errors carry Anthropic's shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from xllm.service.protocol import MAX_STOP_SEQUENCES, OpenAIRequestModel, SamplingFields

# Anthropic's own cap on the number of messages in one request.
MAX_MESSAGES = 100_000
# The sampler holds top_k as a 32-bit integer; Anthropic sets no bound of its own.
MAX_TOP_K = 2**31 - 1

StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]
ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
]


class AnthropicBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AnthropicRequestModel(OpenAIRequestModel):
    """A request body: the same strict types as the OpenAI request models (`max_tokens: true`
    is not 1; 2.0 is 2), so both APIs refuse and accept the same JSON."""


def _only_text_blocks(value: Any) -> Any:
    # Checked before pydantic tries the union, whose own error for an image block would be an
    # unreadable pair of mismatches ("should be a valid string", "Input should be 'text'").
    if isinstance(value, list):
        for i, block in enumerate(value):
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(
                    f"content block {i} has type '{kind}', which this server does not support; "
                    "only 'text' blocks are accepted"
                )
    return value


class TextBlock(AnthropicRequestModel):
    type: Literal["text"] = "text"
    text: str


# A string, or a list of text blocks (joined without separator, as the OpenAI chat endpoint does).
TextContent = Annotated[str | list[TextBlock], BeforeValidator(_only_text_blocks)]


def content_text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(block.text for block in content)


class MessageParam(AnthropicRequestModel):
    role: Literal["user", "assistant"]
    content: TextContent


class MessagesRequest(AnthropicRequestModel):
    """POST /v1/messages."""

    model: str
    max_tokens: int = Field(..., ge=1)
    messages: list[MessageParam] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    system: TextContent | None = None
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=MAX_STOP_SEQUENCES
    )
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    stream: bool = False
    metadata: dict[str, Any] | None = None  # accepted and ignored (Anthropic's end-user id)

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages, the system prompt first as a system message."""
        system = content_text(self.system) if self.system is not None else ""
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": m.role, "content": content_text(m.content)} for m in self.messages]

    def sampling_fields(self) -> SamplingFields:
        """The same sampling request in the OpenAI endpoints' terms, so both share their defaults."""
        return SamplingFields(
            model=self.model,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=self.stop_sequences or None,
        )


# ---- responses -------------------------------------------------------------------------------


class Usage(AnthropicBaseModel):
    input_tokens: int = 0
    output_tokens: int = 0


class MessagesResponse(AnthropicBaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


class ErrorDetail(AnthropicBaseModel):
    type: ErrorType
    message: str


class AnthropicErrorResponse(AnthropicBaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail

"""Pydantic models of OpenAI's request and response schemas for the endpoints xllm serves.

Requests follow OpenAI's field names and ranges, plus vLLM's extra sampling fields (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `min_tokens`, ...), so that clients written for
either server work unchanged. Ranges are enforced here, at the edge, so a bad request gets a 400
naming the field before anything reaches the engine. Types are strict, as OpenAI's are: a
boolean is not an integer and "1" is not a number (an integer is a number, though, since JSON
has one number type). Whatever the server refuses is stated in the models, so the OpenAPI
document FastAPI publishes from them (`tailor_openapi` adds what depends on the loaded model)
describes exactly the requests that are served. Unknown fields are ignored, as OpenAI and vLLM
do, because clients add new fields faster than servers learn them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.json_schema import models_json_schema

# Token ids are checked against the vocabulary later (the model is not known here); these bounds
# only keep absurd values out of the OpenAPI schema and the tokenizer.
MAX_TOKEN_ID = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
# Prompt token ids are refused outside the model's vocabulary; this mark tells `tailor_openapi`
# where to publish that bound once the model is loaded.
VOCABULARY_MARK = "x-xllm-vocabulary-bound"
PromptTokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID, json_schema_extra={VOCABULARY_MARK: True})]
NonEmptyStr = Annotated[str, Field(min_length=1)]
# The cap on `n` and on logprobs is ours: it keeps one request from monopolising the batch.
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
# The samplers hold top_k as an int32 (a k past the vocabulary is "all tokens" anyway).
MAX_TOP_K = 2**31 - 1
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPTS = 64
SEED_MODULUS = 2**63  # the engine's seeds are signed 64-bit integers


def _fold_seed(seed: int) -> int:
    return seed % SEED_MODULUS


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIRequestModel(OpenAIBaseModel):
    """A request body: strict types (no bool -> int, "1" -> 1.0 or 1 -> "1" coercion).

    Lax coercion would accept requests the published schema calls invalid (`[[false]]` as the
    token prompt [[0]]), so a client's mistake would be served as something it did not mean.
    Responses stay lax: the server builds them itself.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _one_number_type(cls, data: Any) -> Any:
        # A model-level step, not a per-field validator: a validator inside a field's type would
        # hide its ge/le bounds from the published schema.
        return integral_floats_as_ints(data)


def integral_floats_as_ints(value: Any) -> Any:
    """`value` (parsed JSON) with every float that has no fraction, such as 2.0, made an int.

    JSON has one number type: JSON Schema's "integer" is any number without a fraction, and
    JavaScript cannot even tell 2 from 2.0, so 2.0 must be as good as 2 for an integer field.
    Strict mode would refuse it; a float field takes the int back unchanged. 2.5, true and "2"
    stay errors for an integer field.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: integral_floats_as_ints(v) for k, v in value.items()}
    return value


class StreamOptions(OpenAIRequestModel):
    include_usage: bool | None = False


class ResumeState(OpenAIRequestModel):
    """Where another instance's stream of this request broke off (xllm's router failover)."""

    token_ids: list[PromptTokenId] = Field(
        ..., min_length=1, description="Output token ids already streamed to the client."
    )
    text_offset: int = Field(0, ge=0, description="Characters of output text already streamed.")


class KVTransferParams(OpenAIRequestModel):
    """Prefill/decode hand-off (vLLM's `kv_transfer_params`), set by the cluster router."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_url: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    transfer_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class KVSendRequest(OpenAIRequestModel):
    """POST /v1/kv/send: a decode instance asks for KV this (prefill) instance holds."""

    transfer_id: str = Field(..., min_length=1, max_length=256)
    destination: str = Field(
        ..., min_length=1, max_length=2048, description="The receiver's transfer address."
    )
    first_block: int = Field(0, ge=0)
    num_tokens: int = Field(..., ge=1)


class SamplingFields(OpenAIRequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # OpenAI's stop is a string or a list of them; an empty one would stop before anything.
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    # Any non-negative integer, folded into the sampler's 63 bits: an upper bound past 2**53 is
    # not portable JSON (JavaScript and schemathesis's boundary values read it as a float, so
    # they would call 2**63 + 191 valid), and no seed is better than another.
    seed: Annotated[int, Field(ge=0), AfterValidator(_fold_seed)] | None = Field(
        None, description="Any non-negative integer; seeds past 2**63 - 1 are taken modulo 2**63."
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM's extra sampling fields.
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="At most the request's max_tokens.")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's prefix-cache isolation: requests with different salts never share cached KV blocks.
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    # vLLM's scheduling priority: lower runs first, and the scheduler preempts the highest value
    # first when KV blocks run out. xllm's classes are 0 = online (the default), 1 = offline.
    # Unset here, the X-Priority header decides (see `serving.request_priority`).
    priority: int = Field(
        0,
        ge=-(2**31),
        le=2**31 - 1,
        description="Lower runs first: 0 online (default), 1 offline (preempted for online work).",
    )

    # vLLM's extension: responses carry the prompt's and each choice's token ids.
    return_token_ids: bool | None = Field(
        False, description="Add prompt_token_ids and each choice's token_ids to the response."
    )
    # xllm's extension for the cluster router: continue a stream another instance started, as if
    # it had not broken off (only n = 1 with one prompt); the response omits what was streamed.
    resume: ResumeState | None = Field(
        None, description="Continue a request from output already streamed elsewhere (n = 1, one prompt)."
    )

    # vLLM's disaggregation field. {"do_remote_decode": true}: this is a prefill instance's part
    # (answered whole, its prompt KV held for a decode instance); {"do_remote_prefill": true,
    # "remote_url": URL, "transfer_id": ID} with `resume` holding the prefill's token: this is
    # the decode part, whose prompt KV comes from that instance. The router sets both.
    kv_transfer_params: KVTransferParams | None = Field(
        None,
        description="Prefill/decode hand-off (set by the cluster router): do_remote_decode for a "
        "prefill part (stream false), or do_remote_prefill with remote_url, transfer_id and the "
        "prefill's token in `resume`; n = 1 and one prompt.",
    )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: (
        Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]],
            Field(min_length=1, max_length=MAX_PROMPTS),
        ]
        | Annotated[list[PromptTokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[PromptTokenId], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_PROMPTS),
        ]
    )
    # OpenAI's default for completions is 16 tokens; None means "up to the context length".
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    # Not supported: stated as "empty" in the schema rather than ignored, since ignoring it would
    # answer something other than what the client asked for.
    suffix: Annotated[str, Field(max_length=0)] | None = Field(
        None, description="Not supported: null or empty."
    )
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only best_of equal to n is supported.")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(
        None, description="Not supported: null or empty."
    )

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        # A field validator rather than a model one, so that the 400 names `best_of`.
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("'best_of' different from 'n' is not supported")
        return v


class TextContentPart(OpenAIRequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    # `max_tokens` is deprecated by OpenAI in favour of `max_completion_tokens`; the latter wins.
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Above 0 only with logprobs set to true."
    )
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(
        None, description="Not supported: null or empty."
    )

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v > 0 and not info.data.get("logprobs"):
            raise ValueError("'top_logprobs' requires 'logprobs' to be true")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses -------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (OpenAI's field)


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogProbs(OpenAIBaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    # With return_token_ids (vLLM's layout): the prompt's ids on a choice's first chunk.
    prompt_token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)
    token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    # A prefill part's answer: where its prompt KV is held (transfer_id, num_tokens, ...).
    kv_transfer_params: dict[str, Any] | None = Field(None, exclude_if=lambda v: v is None)


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogProbs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)
    kv_transfer_params: dict[str, Any] | None = Field(None, exclude_if=lambda v: v is None)


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(None, exclude_if=lambda v: v is None)

    @field_serializer("delta")
    def _delta_without_nulls(self, delta: DeltaMessage) -> dict[str, Any]:
        # OpenAI sends only the fields a delta carries ({"content": "..."}), not "role": null.
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = Field(
        None, exclude_if=lambda v: v is None
    )  # on the first chunk, with return_token_ids


class CompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "xllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


def dump(model: BaseModel) -> dict[str, Any]:
    """The JSON-ready dict of a response model (None fields kept, as OpenAI sends them)."""
    return model.model_dump(mode="json")


# ---- the published OpenAPI document ----------------------------------------------------------

# What streams carry: `data:` lines of chunks (an error object if the stream fails) and `[DONE]`.
STREAM_DONE = "[DONE]"


def stream_response(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The `responses` entry that declares a route's 200 event stream (`"stream": true`).

    Before OpenAPI 3.2 the schema of a text/event-stream describes one event; each event's
    `data` is either `[DONE]` or JSON of `chunk` or of an `ErrorResponse` (`tailor_openapi`
    adds both models to the components, which FastAPI only fills from `response_model`s).
    """
    payload = {
        "anyOf": [
            {"$ref": f"#/components/schemas/{chunk.__name__}"},
            {"$ref": "#/components/schemas/ErrorResponse"},
        ]
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": STREAM_DONE},
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                ]
            }
        },
    }
    return {200: {"content": {"text/event-stream": {"schema": event}}}}


def _walk(node: Any) -> Any:
    """Every dict in a JSON document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def tailor_openapi(doc: dict[str, Any], *, api_key: bool, vocab_size: int | None) -> dict[str, Any]:
    """Make FastAPI's OpenAPI document `doc` say what this server answers; idempotent, in place.

    - Validation errors are 400s (OpenAI's clients expect that), so FastAPI's default 422 and
      its `HTTPValidationError` models go.
    - With an API key, /v1/* declare bearer auth, which is what the middleware enforces.
    - Once the model is loaded (`vocab_size`), prompt token ids are bounded by its vocabulary;
      a larger id is refused with a 400 after validation, so the schema must not invite it.
    """
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for item in doc.get("paths", {}).values():
        for operation in item.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    # The chunk models the event streams of `stream_response` refer to.
    _, defs = models_json_schema(
        [
            (ChatCompletionChunk, "serialization"),
            (CompletionChunk, "serialization"),
            (ErrorResponse, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    if api_key:
        components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
        for path, item in doc.get("paths", {}).items():
            if not path.startswith("/v1/"):
                continue
            for operation in item.values():
                if isinstance(operation, dict):
                    operation.setdefault("security", [{"bearer": []}])
    if vocab_size is not None:
        for node in _walk(doc):
            if node.pop(VOCABULARY_MARK, False):
                node["maximum"] = vocab_size - 1
    return doc

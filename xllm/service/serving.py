"""The OpenAI endpoints' logic: request -> prompts and sampling parameters -> engine -> response.

`Serving` holds what every request needs (the `EngineClient`, the served name, the metrics) and
turns a validated `CompletionRequest` / `ChatCompletionRequest` into either a whole response or
a server-sent-event stream. Both endpoints render the same `ChoiceDeltas` (what each choice
added since the last event): a stream sends one chunk per delta, a whole response renders each
choice's deltas summed. Prompts are tokenized here, once, so that their length is checked
against the context before anything is queued and the usage numbers are exact. The SSE framing
(`framed_stream`: errors as events, the engine run always closed) serves Anthropic's stream too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from xllm.engine.outputs import Logprob, PromptLogprobs, SampleLogprobs
from xllm.engine.sampling_params import SamplingParams
from xllm.hal.kv_transfer import KVTransferError
from xllm.service.deltas import ChoiceDelta, ChoiceDeltas
from xllm.service.engine_client import (
    AdmissionTracker,
    EngineClient,
    EngineRun,
    SubRequest,
    make_sampling_params,
)
from xllm.service.errors import OpenAIError, bad_request, internal_error
from xllm.service.kv_source import HttpKVSource
from xllm.service.metrics import ServiceMetrics
from xllm.service.protocol import (
    ChatChoiceLogProbs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    KVSendRequest,
    PromptTokensDetails,
    SamplingFields,
    UsageInfo,
)

logger = logging.getLogger("xllm.service")

# JSON has no -inf; OpenAI clients expect a number, so impossible tokens report this floor (as vLLM).
LOGPROB_FLOOR = -9999.0
# Used when a tokenizer ships without a chat template, so chat still works on bare checkpoints.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Request fields that, when set, override the model's generation_config defaults (as vLLM).
DEFAULTED_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sse(payload: BaseModel | dict[str, Any] | str) -> str:
    """One server-sent event carrying `payload` as JSON (or a literal such as ``[DONE]``)."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    elif isinstance(payload, dict):
        data = json.dumps(payload, separators=(",", ":"))
    else:
        data = payload
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


def openai_error_event(exc: OpenAIError) -> str:
    return sse(exc.body())


@dataclass(slots=True)
class RequestContext:
    """Per-HTTP-request facts the access log and the metrics need."""

    request_id: str
    arrival_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    auth_headers: dict[str, str] = field(default_factory=dict)  # the client's, for /v1/kv/send
    first_token_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    priority: int = 0  # the engine's scheduling priority (see `request_priority`)


PRIORITY_HEADER = "x-priority"


def request_priority(req: SamplingFields, header: str | None) -> int:
    """The request's scheduling priority: the body's `priority` when it sets one, else the
    X-Priority header (for clients that cannot add body fields), else 0 (online). Lower runs
    first; the engine's classes are `Priority.ONLINE` = 0 and `Priority.OFFLINE` = 1."""
    if "priority" in req.model_fields_set or header is None:
        return req.priority
    text = header.strip()
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or not -(2**31) <= value < 2**31 or text.startswith("+"):
        raise bad_request(f"X-Priority must be an integer, got {header!r}", param="priority")
    return value


def _clamp(lp: float) -> float:
    return max(float(lp), LOGPROB_FLOOR)


class Serving:
    """Completions and chat completions over one `EngineClient`."""

    def __init__(
        self,
        engine: EngineClient,
        served_model_name: str,
        metrics: ServiceMetrics,
        active_ids: set[str],
        max_queue: int | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.served_model_name = served_model_name
        self.metrics = metrics
        self.active_ids = active_ids
        self.max_queue = max_queue
        self.admission = AdmissionTracker()
        self.max_model_len = engine.max_model_len
        # Ids the tokenizer cannot decode are refused here; the engine refuses any past the
        # model's embedding table itself.
        self.vocab_size = len(engine.tokenizer)
        # The sampling defaults of the model's generation_config.json.
        self.model_defaults = engine.default_sampling_params().model_dump(
            include=set(DEFAULTED_SAMPLING_FIELDS)
        )

    # ---- checks shared by every endpoint ----------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_model_name:
            raise OpenAIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.served_model_name}'.",
                param="model",
                code="model_not_found",
            )

    def check_queue(self) -> None:
        if self.max_queue is None:
            return
        waiting = self.admission.would_wait(self.engine)
        if waiting > self.max_queue:
            raise OpenAIError(
                429,
                f"The server is overloaded: {waiting} requests are waiting (limit {self.max_queue}). Retry later.",
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    def checked_max_tokens(
        self, requested: int | None, prompt_len: int, param: str, max_tokens_param: str, min_tokens: int = 0
    ) -> int:
        """The completion's token budget: `requested`, or all the context leaves when None;
        a 400 when the prompt leaves no room for it."""
        if prompt_len >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{prompt_len} tokens, leaving no room to generate. Shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        if requested is None:
            room = self.max_model_len - prompt_len
            if min_tokens > room:
                # Also a context overflow (not a bad min_tokens): a shorter prompt would fit.
                raise bad_request(
                    f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                    f"{prompt_len} tokens, leaving {room} for the completion, fewer than min_tokens "
                    f"({min_tokens}). Reduce the prompt or min_tokens.",
                    param="min_tokens",
                    code="context_length_exceeded",
                )
            return room
        if prompt_len + requested > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
                f"Reduce the prompt or {max_tokens_param}.",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        return requested

    def _tokenize(self, text: str, *, add_special_tokens: bool, param: str) -> list[int]:
        try:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        except Exception as exc:  # e.g. lone surrogates the Rust tokenizer cannot take
            raise bad_request(
                f"The prompt could not be tokenized: {type(exc).__name__}", param=param
            ) from exc

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(
                f"Token id {bad} is outside the vocabulary [0, {self.vocab_size}).", param=param
            )
        if not ids:
            raise bad_request("The prompt is empty.", param=param)
        return ids

    def _sampling(
        self, req: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        # Fields the request leaves unset take the model's generation_config defaults (as vLLM);
        # the engine samples the request's `n` choices itself, sharing the prompt's KV blocks.
        requested = req.model_dump(include=set(DEFAULTED_SAMPLING_FIELDS), exclude_none=True)
        return make_sampling_params(
            **{**self.model_defaults, **requested},
            n=req.n,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            stop=req.stop_list(),
            stop_token_ids=req.stop_token_ids or [],
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            cache_salt=req.cache_salt,
        )

    def sub_requests(
        self,
        request_id: str,
        prompts: list[tuple[str | None, list[int]]],
        req: SamplingFields,
        max_tokens: list[int],
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        priority: int = 0,
        auth_headers: dict[str, str] | None = None,
    ) -> list[SubRequest]:
        """One engine request per prompt; prompt p's `n` choices are the response's p*n .. p*n+n-1."""
        resume = req.resume
        if resume is not None and (req.n != 1 or len(prompts) != 1):
            raise bad_request("'resume' needs n = 1 and a single prompt.", param="resume")
        kv_hold, kv_source = self.kv_handoff(req, len(prompts), auth_headers or {})
        return [
            SubRequest(
                f"{request_id}-{p}",
                ids,
                text,
                self._sampling(req, max_tokens[p], logprobs, prompt_logprobs),
                choice_base=p * req.n,
                priority=priority,
                resume_ids=list(resume.token_ids) if resume is not None else [],
                resume_text_offset=resume.text_offset if resume is not None else 0,
                kv_hold=kv_hold,
                kv_source=kv_source,
            )
            for p, (text, ids) in enumerate(prompts)
        ]

    def kv_handoff(
        self, req: SamplingFields, num_prompts: int, auth_headers: dict[str, str]
    ) -> tuple[bool, HttpKVSource | None]:
        """The request's part in a prefill/decode hand-off: (hold the prompt KV, where to get it)."""
        p = req.kv_transfer_params
        if p is None or not (p.do_remote_decode or p.do_remote_prefill):
            return False, None
        param = "kv_transfer_params"
        if p.do_remote_decode and p.do_remote_prefill:
            raise bad_request("Set one of do_remote_decode and do_remote_prefill.", param=param)
        if req.n != 1 or num_prompts != 1:
            raise bad_request("A prefill/decode hand-off needs n = 1 and a single prompt.", param=param)
        if p.do_remote_decode:
            if req.stream:
                raise bad_request(
                    "The prefill part (do_remote_decode) is answered whole: stream must be false.",
                    param=param,
                )
            return True, None
        if p.remote_url is None or p.transfer_id is None or req.resume is None:
            raise bad_request(
                "The decode part (do_remote_prefill) needs remote_url, transfer_id and the prefill's token in resume.",
                param=param,
            )
        return False, HttpKVSource(p.remote_url, p.transfer_id, dict(auth_headers))

    async def send_held_kv(self, body: KVSendRequest) -> dict[str, Any]:
        """POST /v1/kv/send: pushes held prompt KV to a decode instance."""
        try:
            stats = await asyncio.to_thread(
                self.engine.send_held_kv,
                body.transfer_id,
                body.destination,
                body.first_block,
                body.num_tokens,
            )
        except KeyError as exc:
            raise OpenAIError(404, str(exc.args[0]), param="transfer_id", code="kv_not_held") from exc
        except ValueError as exc:
            raise bad_request(str(exc), param="num_tokens") from exc
        except KVTransferError as exc:
            raise OpenAIError(502, str(exc), code="kv_transfer_failed") from exc
        return {
            "transfer_id": body.transfer_id,
            "bytes": stats.bytes,
            "blocks": stats.blocks,
            "seconds": stats.seconds,
        }

    # ---- logprobs ---------------------------------------------------------------------------

    def _decoded(self, token_id: int, lp: Logprob | None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])

    @staticmethod
    def _top(lp_dict: dict[int, Logprob], top_n: int) -> list[tuple[int, Logprob]]:
        def order(item: tuple[int, Logprob]) -> tuple[int, float]:
            rank = item[1].rank
            return (rank if rank is not None else 10**9, -item[1].logprob)

        return sorted(lp_dict.items(), key=order)[:top_n]

    def add_completion_logprobs(
        self,
        out: CompletionLogProbs,
        token_ids: Sequence[int],
        logprobs: SampleLogprobs | PromptLogprobs | None,
        top_n: int,
        text_offset: int,
    ) -> int:
        """Append the tokens' entries to `out`; returns the text offset after the last token."""
        for i, tid in enumerate(token_ids):
            lp_dict = logprobs[i] if logprobs is not None and i < len(logprobs) else None
            chosen = lp_dict.get(tid) if lp_dict else None
            token = self._decoded(tid, chosen)
            out.tokens.append(token)
            if not lp_dict:  # e.g. the first prompt token under echo has no logprob
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                out.token_logprobs.append(_clamp(chosen.logprob) if chosen is not None else None)
                top = {self._decoded(t, lp): _clamp(lp.logprob) for t, lp in self._top(lp_dict, top_n)}
                if chosen is not None:
                    top.setdefault(token, _clamp(chosen.logprob))
                out.top_logprobs.append(top)
            out.text_offset.append(text_offset)
            text_offset += len(token)
        return text_offset

    def chat_logprobs(
        self, token_ids: Sequence[int], logprobs: SampleLogprobs | None, top_n: int
    ) -> ChatChoiceLogProbs:
        content: list[ChatTokenLogprob] = []
        for i, tid in enumerate(token_ids):
            lp_dict = (logprobs[i] if logprobs is not None and i < len(logprobs) else None) or {}
            chosen = lp_dict.get(tid)
            token = self._decoded(tid, chosen)
            content.append(
                ChatTokenLogprob(
                    token=token,
                    logprob=_clamp(chosen.logprob) if chosen is not None else LOGPROB_FLOOR,
                    bytes=list(token.encode("utf-8", errors="replace")),
                    top_logprobs=[
                        ChatTopLogprob(
                            token=(s := self._decoded(t, lp)),
                            logprob=_clamp(lp.logprob),
                            bytes=list(s.encode("utf-8", errors="replace")),
                        )
                        for t, lp in self._top(lp_dict, top_n)
                    ],
                )
            )
        return ChatChoiceLogProbs(content=content)

    # ---- prompt preparation -----------------------------------------------------------------

    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        p = req.prompt
        if isinstance(p, str):
            return [
                (p, self._check_ids(self._tokenize(p, add_special_tokens=True, param="prompt"), "prompt"))
            ]
        if p and all(isinstance(x, str) for x in p):
            return [
                (s, self._check_ids(self._tokenize(s, add_special_tokens=True, param="prompt"), "prompt"))
                for s in p
            ]
        if p and all(isinstance(x, int) for x in p):
            return [(None, self._check_ids(list(p), "prompt"))]
        return [(None, self._check_ids(list(ids), "prompt")) for ids in p]

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        return self.templated_prompt([{"role": m.role, "content": m.text()} for m in req.messages])

    def templated_prompt(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """(text, ids) of `messages` under the chat template; /v1/messages builds its prompt here too."""
        text = chat_prompt_text(self.tokenizer, messages)
        # The template already carries BOS and friends; adding special tokens again would double them.
        ids = self._check_ids(self._tokenize(text, add_special_tokens=False, param="messages"), "messages")
        return text, ids

    # ---- completions ------------------------------------------------------------------------

    async def completions(
        self, req: CompletionRequest, ctx: RequestContext
    ) -> CompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        prompts = self.completion_prompts(req)
        max_tokens = [
            self.checked_max_tokens(req.max_tokens, len(ids), "prompt", "max_tokens", req.min_tokens)
            for _, ids in prompts
        ]
        self.check_queue()
        ctx.prompt_tokens = sum(len(ids) for _, ids in prompts)
        prompt_logprobs = req.logprobs if req.echo else None
        deltas = await self.start(
            self.sub_requests(
                ctx.request_id,
                prompts,
                req,
                max_tokens,
                req.logprobs,
                prompt_logprobs,
                ctx.priority,
                auth_headers=ctx.auth_headers,
            )
        )
        # Per choice: where its next token starts in its text (a resumed one's streamed text first).
        offsets: dict[int, int] = {0: req.resume.text_offset} if req.resume is not None else {}

        def choice(d: ChoiceDelta) -> CompletionChoice:
            return self._completion_choice(req, d, offsets)

        if req.stream:
            return self.openai_stream(ctx, deltas, CompletionChunk, choice, req.include_usage_in_stream)
        choices = [choice(d) for d in await self.whole(ctx, deltas)]
        return CompletionResponse(
            id=ctx.request_id,
            model=self.served_model_name,
            choices=choices,
            usage=self.usage(ctx),
            kv_transfer_params=deltas.kv_transfer_params,
        )

    def _completion_choice(
        self, req: CompletionRequest, d: ChoiceDelta, offsets: dict[int, int]
    ) -> CompletionChoice:
        """A delta as a completion choice; a choice's first one carries the echoed prompt."""
        echo = req.echo and d.first
        text = d.text
        if echo:
            prompt = d.sub.prompt_text
            text = (prompt if prompt is not None else self.tokenizer.decode(d.sub.prompt_ids)) + text
        lps = None
        if req.logprobs is not None:
            lps = CompletionLogProbs()
            offset = offsets.get(d.index, 0)
            if echo:
                offset = self.add_completion_logprobs(
                    lps, d.sub.prompt_ids, d.prompt_logprobs, req.logprobs, offset
                )
            offsets[d.index] = self.add_completion_logprobs(
                lps, d.token_ids, d.logprobs, req.logprobs, offset
            )
        ids = req.return_token_ids
        return CompletionChoice(
            index=d.index,
            text=text,
            logprobs=lps,
            finish_reason=d.finish_reason,
            prompt_token_ids=d.sub.prompt_ids if ids and d.first else None,
            token_ids=d.token_ids if ids else None,
        )

    # ---- chat -------------------------------------------------------------------------------

    async def chat(
        self, req: ChatCompletionRequest, ctx: RequestContext
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        text, ids = self.chat_prompt(req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.checked_max_tokens(
            req.requested_max_tokens, len(ids), "messages", param, req.min_tokens
        )
        self.check_queue()
        ctx.prompt_tokens = len(ids)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        deltas = await self.start(
            self.sub_requests(
                ctx.request_id,
                [(text, ids)],
                req,
                [max_tokens],
                top_n,
                priority=ctx.priority,
                auth_headers=ctx.auth_headers,
            )
        )

        def logprobs(d: ChoiceDelta) -> ChatChoiceLogProbs | None:
            return None if top_n is None else self.chat_logprobs(d.token_ids, d.logprobs, top_n)

        if req.stream:

            def choice(d: ChoiceDelta) -> ChatCompletionStreamChoice:
                return ChatCompletionStreamChoice(
                    index=d.index,
                    delta=DeltaMessage(content=d.text),
                    logprobs=logprobs(d),
                    finish_reason=d.finish_reason,
                    token_ids=d.token_ids if req.return_token_ids else None,
                )

            # OpenAI sends the role alone in each choice's first delta, before any content (a
            # resumed stream's client has had it).
            roles = [
                ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                for i in range(req.n)
                if req.resume is None
            ]
            return self.openai_stream(
                ctx,
                deltas,
                ChatCompletionChunk,
                choice,
                req.include_usage_in_stream,
                head=roles,
                prompt_token_ids=ids if req.return_token_ids and req.resume is None else None,
            )
        choices = [
            ChatCompletionChoice(
                index=d.index,
                message=ChatResponseMessage(content=d.text),
                logprobs=logprobs(d),
                finish_reason=d.finish_reason,
                token_ids=d.token_ids if req.return_token_ids else None,
            )
            for d in await self.whole(ctx, deltas)
        ]
        return ChatCompletionResponse(
            id=ctx.request_id,
            model=self.served_model_name,
            choices=choices,
            usage=self.usage(ctx),
            prompt_token_ids=ids if req.return_token_ids else None,
            kv_transfer_params=deltas.kv_transfer_params,
        )

    # ---- shared plumbing --------------------------------------------------------------------

    async def start(self, subs: list[SubRequest]) -> ChoiceDeltas:
        """Start the engine requests and wait for their first output (see `ChoiceDeltas.start`)."""
        deltas = ChoiceDeltas(EngineRun(self.engine, subs, self.active_ids, self.admission))
        await deltas.start()
        return deltas

    async def whole(self, ctx: RequestContext, deltas: ChoiceDeltas) -> list[ChoiceDelta]:
        """Each choice's whole output (see `ChoiceDeltas.whole`), the usage recorded."""
        wholes = await deltas.whole()
        self.finish(ctx, deltas)
        return wholes

    def openai_stream(
        self,
        ctx: RequestContext,
        deltas: ChoiceDeltas,
        chunk_cls: type[CompletionChunk] | type[ChatCompletionChunk],
        choice: Callable[[ChoiceDelta], Any],
        include_usage: bool,
        head: Sequence[Any] = (),
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[str]:
        """An OpenAI stream: a chunk per `head` choice, then one per delta as `choice` renders it,
        then the usage chunk if asked for, and ``[DONE]``. `prompt_token_ids` (chat's
        return_token_ids) go on the first chunk."""
        first = [prompt_token_ids]

        def chunk(choices: list[Any], usage: UsageInfo | None = None) -> str:
            extra = {"prompt_token_ids": first.pop()} if first and first[0] is not None else {}
            first.clear()
            return sse(
                chunk_cls(
                    id=ctx.request_id, model=self.served_model_name, choices=choices, usage=usage, **extra
                )
            )

        async def body() -> AsyncIterator[str]:
            for c in head:
                yield chunk([c])
            async for d in deltas:
                yield chunk([choice(d)])

        def tail() -> list[str]:
            return [chunk([], self.usage(ctx))] if include_usage else []

        return self.framed_stream(ctx, deltas, body(), tail)

    async def framed_stream(
        self,
        ctx: RequestContext,
        deltas: ChoiceDeltas,
        body: AsyncIterator[str],
        tail: Callable[[], list[str]],
        error_event: Callable[[OpenAIError], str] = openai_error_event,
        done: str | None = SSE_DONE,
    ) -> AsyncIterator[str]:
        """SSE framing every endpoint shares: the renderer's `body` events; once the engine is
        done, the usage is recorded and `tail()`'s closing events follow. A failure mid-stream
        becomes an `error_event` in the API's shape (never a stack trace); the engine run is
        always closed (aborting what is unfinished, e.g. when the client went away) and `done`
        (OpenAI's ``[DONE]``) always ends the stream."""
        try:
            async for event in body:
                yield event
            self.finish(ctx, deltas)
            for event in tail():
                yield event
        except OpenAIError as exc:
            yield error_event(exc)
        except Exception:
            logger.exception("request %s failed mid-stream", ctx.request_id)
            yield error_event(internal_error())
        finally:
            await body.aclose()
            await deltas.aclose()
        if done is not None:
            yield done

    def finish(self, ctx: RequestContext, deltas: ChoiceDeltas) -> None:
        """Record usage and latency metrics once the whole request has finished."""
        ctx.first_token_s = deltas.first_token_s
        ctx.completion_tokens = deltas.completion_tokens
        ctx.cached_tokens = deltas.cached_tokens
        ctx.finish_reasons = [reason or "unknown" for reason in deltas.finish_reasons]
        e2e = time.monotonic() - ctx.arrival_s
        ttft = ctx.first_token_s - ctx.arrival_s if ctx.first_token_s is not None else None
        per_choice = ctx.completion_tokens // max(len(ctx.finish_reasons), 1)
        self.metrics.observe_request(
            ttft_s=ttft, e2e_s=e2e, num_generated=per_choice, finish_reasons=ctx.finish_reasons
        )

    @staticmethod
    def usage(ctx: RequestContext) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            total_tokens=ctx.prompt_tokens + ctx.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=ctx.cached_tokens),
        )


def chat_prompt_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """`messages` rendered by the tokenizer's chat template (or `FALLBACK_CHAT_TEMPLATE`), with
    the generation prompt; needs no engine, so the cluster router tokenizes chats the same way."""
    kwargs: dict[str, Any] = {}
    if tokenizer.chat_template is None:
        kwargs["chat_template"] = FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as exc:  # jinja raises for e.g. roles the template does not accept
        raise bad_request(
            f"The messages do not fit the model's chat template: {exc}", param="messages"
        ) from exc


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"

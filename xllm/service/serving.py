"""The OpenAI endpoints' logic: request -> prompts and sampling parameters -> engine -> response.

`Serving` holds what every request needs (the engine, the served name, the metrics) and turns a
validated `CompletionRequest` / `ChatCompletionRequest` into either a whole response or a
server-sent-event stream. The engine's outputs are cumulative (text and tokens so far), so a
stream sends the difference from what it sent before, per choice. Prompts are tokenized here,
once, so that their length is checked against the context before anything is queued and the
usage numbers are exact.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from xllm.service.engine_client import (
    AdmissionTracker,
    EngineRun,
    SubRequest,
    make_sampling_params,
    sampling_param_names,
)
from xllm.service.errors import OpenAIError, bad_request, internal_error
from xllm.service.metrics import ServiceMetrics
from xllm.service.protocol import (
    SEED_MODULUS,
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


def sse(payload: BaseModel | dict[str, Any] | str) -> str:
    """One server-sent event carrying `payload` as JSON (or a literal such as ``[DONE]``)."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    elif isinstance(payload, dict):
        import json

        data = json.dumps(payload, separators=(",", ":"))
    else:
        data = payload
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


@dataclass(slots=True)
class RequestContext:
    """Per-HTTP-request facts the access log and the metrics need."""

    request_id: str
    arrival_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ChoiceCursor:
    """How much of one choice's cumulative output has been sent already."""

    text_len: int = 0
    num_tokens: int = 0
    started: bool = False
    finished: bool = False
    text_offset: int = 0  # completions logprobs: offset of the next token in the choice's text


def _clamp(lp: float) -> float:
    return max(float(lp), LOGPROB_FLOOR)


class Serving:
    """Completions and chat completions over one `AsyncLLM`."""

    def __init__(
        self,
        engine: Any,
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
        self.max_model_len = int(engine.max_model_len)
        self.vocab_size = self._vocab_size(engine)
        self.model_defaults = self._model_defaults(engine)

    @staticmethod
    def _model_defaults(engine: Any) -> dict[str, Any]:
        """The sampling defaults of the model's generation_config.json, when the engine has them."""
        get = getattr(engine, "default_sampling_params", None)
        if not callable(get):
            return {}
        defaults = get()
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        return {k: getattr(defaults, k) for k in keys if getattr(defaults, k, None) is not None}

    @staticmethod
    def _vocab_size(engine: Any) -> int:
        sizes = [len(engine.tokenizer)]
        for holder in (engine, getattr(engine, "model_config", None), getattr(engine, "config", None)):
            v = getattr(holder, "vocab_size", None) if holder is not None else None
            if isinstance(v, int) and v > 0:
                sizes.append(v)
        return min(sizes)

    # ---- checks shared by both endpoints ----------------------------------------------------

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

    def _max_tokens(
        self, requested: int | None, prompt_len: int, param: str, max_tokens_param: str, min_tokens: int = 0
    ) -> int:
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
        self, req: SamplingFields, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None, n: int
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(required, optional) SamplingParams keywords; see `make_sampling_params`."""
        required: dict[str, Any] = {"max_tokens": max_tokens}
        # Fields the request leaves unset take the model's generation_config defaults (as vLLM).
        optional: dict[str, Any] = {"temperature": 1.0, **self.model_defaults}
        if req.temperature is not None:
            optional["temperature"] = req.temperature
        if n > 1:
            required["n"] = n
        # A value equal to "disabled" (top_p 1, top_k 0/-1, min_p 0, repetition_penalty 1) overrides
        # the model's default but need not be supported; anything else must be.
        neutral = {"top_p": (1.0,), "top_k": (0, -1), "min_p": (0.0,), "repetition_penalty": (1.0,)}
        for key, off in neutral.items():
            value = getattr(req, key)
            if value is None:
                continue
            optional[key] = value
            if value not in off:
                required[key] = value
        if req.seed is not None:
            required["seed"] = req.seed
        if req.stop_token_ids:
            required["stop_token_ids"] = req.stop_token_ids
        for key in ("presence_penalty", "frequency_penalty"):
            value = getattr(req, key)
            if value:
                required[key] = value
        if req.stop_list():
            required["stop"] = req.stop_list()
        if req.ignore_eos:
            required["ignore_eos"] = True
        if req.min_tokens:
            required["min_tokens"] = req.min_tokens
        if logprobs is not None:
            required["logprobs"] = logprobs
        if prompt_logprobs is not None:
            optional["prompt_logprobs"] = prompt_logprobs
        if not req.skip_special_tokens:
            required["skip_special_tokens"] = False
        if req.include_stop_str_in_output:
            required["include_stop_str_in_output"] = True
        if req.cache_salt is not None:
            required["cache_salt"] = req.cache_salt
        return required, optional

    def _sub_requests(
        self,
        request_id: str,
        prompts: list[tuple[str | None, list[int]]],
        req: SamplingFields,
        max_tokens: list[int],
        logprobs: int | None,
        prompt_logprobs: int | None,
    ) -> list[SubRequest]:
        # The engine's own `n` keeps the prompt's blocks shared; without it, fan out per choice.
        engine_n = "n" in sampling_param_names()
        subs: list[SubRequest] = []
        for p, (text, ids) in enumerate(prompts):
            if engine_n or req.n == 1:
                required, optional = self._sampling(req, max_tokens[p], logprobs, prompt_logprobs, req.n)
                params = make_sampling_params(required, optional)
                subs.append(SubRequest(f"{request_id}-{p}", ids, text, params, p * req.n))
                continue
            for i in range(req.n):
                required, optional = self._sampling(req, max_tokens[p], logprobs, prompt_logprobs, 1)
                if "seed" in required:  # distinct samples per choice, still reproducible
                    required["seed"] = (required["seed"] + i) % SEED_MODULUS
                params = make_sampling_params(required, optional)
                subs.append(SubRequest(f"{request_id}-{p}-{i}", ids, text, params, p * req.n + i))
        return subs

    # ---- logprobs ---------------------------------------------------------------------------

    def _decoded(self, token_id: int, lp: Any) -> str:
        text = getattr(lp, "decoded_token", None)
        return text if text is not None else self.tokenizer.decode([token_id])

    def _top(self, lp_dict: dict[int, Any], top_n: int) -> list[tuple[int, Any]]:
        ranked = sorted(
            lp_dict.items(), key=lambda kv: (getattr(kv[1], "rank", None) or 10**9, -kv[1].logprob)
        )
        return ranked[:top_n]

    def completion_logprobs(
        self, token_ids: list[int], logprobs: list[Any] | None, top_n: int, cursor: ChoiceCursor
    ) -> CompletionLogProbs:
        out = CompletionLogProbs()
        for i, tid in enumerate(token_ids):
            lp_dict = logprobs[i] if logprobs is not None and i < len(logprobs) else None
            if not lp_dict:  # e.g. the first prompt token under echo has no logprob
                token = self.tokenizer.decode([tid])
                out.tokens.append(token)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                chosen = lp_dict.get(tid)
                token = self._decoded(tid, chosen) if chosen is not None else self.tokenizer.decode([tid])
                out.tokens.append(token)
                out.token_logprobs.append(_clamp(chosen.logprob) if chosen is not None else None)
                top = {self._decoded(t, lp): _clamp(lp.logprob) for t, lp in self._top(lp_dict, top_n)}
                if chosen is not None:
                    top.setdefault(token, _clamp(chosen.logprob))
                out.top_logprobs.append(top)
            out.text_offset.append(cursor.text_offset)
            cursor.text_offset += len(token)
        return out

    def chat_logprobs(
        self, token_ids: list[int], logprobs: list[Any] | None, top_n: int
    ) -> ChatChoiceLogProbs:
        content: list[ChatTokenLogprob] = []
        for i, tid in enumerate(token_ids):
            lp_dict = (logprobs[i] if logprobs is not None and i < len(logprobs) else None) or {}
            chosen = lp_dict.get(tid)
            token = self._decoded(tid, chosen) if chosen is not None else self.tokenizer.decode([tid])
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
        kwargs: dict[str, Any] = {}
        if getattr(self.tokenizer, "chat_template", None) is None:
            kwargs["chat_template"] = FALLBACK_CHAT_TEMPLATE
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as exc:  # jinja raises for e.g. roles the template does not accept
            raise bad_request(
                f"The messages do not fit the model's chat template: {exc}", param="messages"
            ) from exc
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
            self._max_tokens(req.max_tokens, len(ids), "prompt", "max_tokens", req.min_tokens)
            for _, ids in prompts
        ]
        self.check_queue()
        ctx.prompt_tokens = sum(len(ids) for _, ids in prompts)
        want_prompt_lps = req.logprobs if (req.echo and req.logprobs is not None) else None
        subs = self._sub_requests(ctx.request_id, prompts, req, max_tokens, req.logprobs, want_prompt_lps)
        run = EngineRun(self.engine, subs, self.active_ids, self.admission)
        outputs = run.outputs()
        first = await self._first(outputs, run)
        if req.stream:
            events = self._completion_events(req, ctx, outputs, first)
            return self._framed_stream(
                ctx, subs, outputs, events, CompletionChunk, req.include_usage_in_stream
            )
        try:
            await self._drain(outputs, first, ctx)
        finally:
            await outputs.aclose()
        choices: list[CompletionChoice] = []
        for sub in subs:
            for o in sub.last.outputs:
                cursor = ChoiceCursor()
                text, lps = o.text, None
                if req.echo:
                    prompt_text = (
                        sub.prompt_text
                        if sub.prompt_text is not None
                        else self.tokenizer.decode(sub.prompt_ids)
                    )
                    text = prompt_text + text
                if req.logprobs is not None:
                    lps = CompletionLogProbs()
                    if req.echo:
                        prompt_lps = getattr(sub.last, "prompt_logprobs", None)
                        self._extend(
                            lps, self.completion_logprobs(sub.prompt_ids, prompt_lps, req.logprobs, cursor)
                        )
                    self._extend(
                        lps, self.completion_logprobs(list(o.token_ids), o.logprobs, req.logprobs, cursor)
                    )
                choices.append(
                    CompletionChoice(
                        index=sub.choice_base + o.index,
                        text=text,
                        logprobs=lps,
                        finish_reason=o.finish_reason,
                    )
                )
        choices.sort(key=lambda c: c.index)
        self._finish(ctx, subs)
        return CompletionResponse(
            id=ctx.request_id, model=self.served_model_name, choices=choices, usage=self._usage(ctx)
        )

    @staticmethod
    def _extend(acc: CompletionLogProbs, more: CompletionLogProbs) -> None:
        acc.tokens += more.tokens
        acc.token_logprobs += more.token_logprobs
        acc.top_logprobs += more.top_logprobs
        acc.text_offset += more.text_offset

    async def _completion_events(
        self,
        req: CompletionRequest,
        ctx: RequestContext,
        outputs: AsyncIterator[tuple[SubRequest, Any]],
        first: tuple[SubRequest, Any] | None,
    ) -> AsyncIterator[str]:
        """The body of the stream: one SSE event per new piece of a choice (see `_framed_stream`)."""
        cursors: dict[int, ChoiceCursor] = {}
        async for sub, out in self._with_first(outputs, first):
            self._note_progress(ctx, out)
            for o in out.outputs:
                idx = sub.choice_base + o.index
                cur = cursors.setdefault(idx, ChoiceCursor())
                if cur.finished:
                    continue
                delta_text = o.text[cur.text_len :]
                new_ids = list(o.token_ids[cur.num_tokens :])
                lps = None
                if not cur.started and req.echo:
                    prompt_text = (
                        sub.prompt_text
                        if sub.prompt_text is not None
                        else self.tokenizer.decode(sub.prompt_ids)
                    )
                    delta_text = prompt_text + delta_text
                    if req.logprobs is not None:
                        lps = self.completion_logprobs(
                            sub.prompt_ids, getattr(out, "prompt_logprobs", None), req.logprobs, cur
                        )
                if req.logprobs is not None:
                    new_lps = list(o.logprobs[cur.num_tokens :]) if o.logprobs is not None else None
                    gen = self.completion_logprobs(new_ids, new_lps, req.logprobs, cur)
                    if lps is None:
                        lps = gen
                    else:
                        self._extend(lps, gen)
                finished = o.finish_reason is not None
                if not delta_text and not finished and cur.started:
                    continue
                cur.started = True
                cur.text_len, cur.num_tokens = len(o.text), len(o.token_ids)
                cur.finished = finished
                chunk = CompletionChunk(
                    id=ctx.request_id,
                    model=self.served_model_name,
                    choices=[
                        CompletionChoice(
                            index=idx, text=delta_text, logprobs=lps, finish_reason=o.finish_reason
                        )
                    ],
                )
                yield sse(chunk)

    # ---- chat -------------------------------------------------------------------------------

    async def chat(
        self, req: ChatCompletionRequest, ctx: RequestContext
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        text, ids = self.chat_prompt(req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(req.requested_max_tokens, len(ids), "messages", param, req.min_tokens)
        self.check_queue()
        ctx.prompt_tokens = len(ids)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        subs = self._sub_requests(ctx.request_id, [(text, ids)], req, [max_tokens], top_n, None)
        run = EngineRun(self.engine, subs, self.active_ids, self.admission)
        outputs = run.outputs()
        first = await self._first(outputs, run)
        if req.stream:
            events = self._chat_events(req, ctx, outputs, first, top_n)
            return self._framed_stream(
                ctx, subs, outputs, events, ChatCompletionChunk, req.include_usage_in_stream
            )
        try:
            await self._drain(outputs, first, ctx)
        finally:
            await outputs.aclose()
        choices = [
            ChatCompletionChoice(
                index=sub.choice_base + o.index,
                message=ChatResponseMessage(content=o.text),
                logprobs=self.chat_logprobs(list(o.token_ids), o.logprobs, top_n)
                if top_n is not None
                else None,
                finish_reason=o.finish_reason,
            )
            for sub in subs
            for o in sub.last.outputs
        ]
        choices.sort(key=lambda c: c.index)
        self._finish(ctx, subs)
        return ChatCompletionResponse(
            id=ctx.request_id, model=self.served_model_name, choices=choices, usage=self._usage(ctx)
        )

    async def _chat_events(
        self,
        req: ChatCompletionRequest,
        ctx: RequestContext,
        outputs: AsyncIterator[tuple[SubRequest, Any]],
        first: tuple[SubRequest, Any] | None,
        top_n: int | None,
    ) -> AsyncIterator[str]:
        """The body of the stream: one SSE event per new piece of a choice (see `_framed_stream`)."""
        cursors: dict[int, ChoiceCursor] = {}
        # OpenAI sends the role alone in each choice's first delta, before any content.
        for i in range(req.n):
            yield sse(
                ChatCompletionChunk(
                    id=ctx.request_id,
                    model=self.served_model_name,
                    choices=[
                        ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                    ],
                )
            )
        async for sub, out in self._with_first(outputs, first):
            self._note_progress(ctx, out)
            for o in out.outputs:
                idx = sub.choice_base + o.index
                cur = cursors.setdefault(idx, ChoiceCursor())
                if cur.finished:
                    continue
                delta_text = o.text[cur.text_len :]
                finished = o.finish_reason is not None
                if not delta_text and not finished:
                    continue
                lps = None
                if top_n is not None:
                    new_lps = list(o.logprobs[cur.num_tokens :]) if o.logprobs is not None else None
                    lps = self.chat_logprobs(list(o.token_ids[cur.num_tokens :]), new_lps, top_n)
                cur.text_len, cur.num_tokens, cur.finished = len(o.text), len(o.token_ids), finished
                yield sse(
                    ChatCompletionChunk(
                        id=ctx.request_id,
                        model=self.served_model_name,
                        choices=[
                            ChatCompletionStreamChoice(
                                index=idx,
                                delta=DeltaMessage(content=delta_text),
                                logprobs=lps,
                                finish_reason=o.finish_reason,
                            )
                        ],
                    )
                )

    # ---- shared plumbing --------------------------------------------------------------------

    async def _framed_stream(
        self,
        ctx: RequestContext,
        subs: list[SubRequest],
        outputs: AsyncIterator[tuple[SubRequest, Any]],
        events: AsyncIterator[str],
        chunk_cls: type[CompletionChunk] | type[ChatCompletionChunk],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """SSE framing both endpoints share: the body's events, then the usage chunk if asked for;
        a failure mid-stream becomes an OpenAI error event (never a stack trace); the engine
        stream is always closed (aborting what is unfinished) and ``[DONE]`` always ends it."""
        try:
            async for event in events:
                yield event
            self._finish(ctx, subs)
            if include_usage:
                yield sse(
                    chunk_cls(
                        id=ctx.request_id, model=self.served_model_name, choices=[], usage=self._usage(ctx)
                    )
                )
        except OpenAIError as exc:
            yield sse(exc.body())
        except Exception:
            logger.exception("request %s failed mid-stream", ctx.request_id)
            yield sse(internal_error().body())
        finally:
            await events.aclose()
            await outputs.aclose()
        yield SSE_DONE

    async def _first(
        self, outputs: AsyncIterator[tuple[SubRequest, Any]], run: EngineRun
    ) -> tuple[SubRequest, Any] | None:
        """Wait for the first output so that engine errors (e.g. a too-long prompt) still get a
        proper HTTP status instead of an error inside an already-started 200 stream."""
        try:
            return await outputs.__anext__()
        except StopAsyncIteration:
            return None
        except BaseException:
            await outputs.aclose()
            await run.close()
            raise

    @staticmethod
    async def _with_first(
        outputs: AsyncIterator[tuple[SubRequest, Any]], first: tuple[SubRequest, Any] | None
    ) -> AsyncIterator[tuple[SubRequest, Any]]:
        if first is None:
            return
        yield first
        async for item in outputs:
            yield item

    async def _drain(
        self,
        outputs: AsyncIterator[tuple[SubRequest, Any]],
        first: tuple[SubRequest, Any] | None,
        ctx: RequestContext,
    ) -> None:
        async for _, out in self._with_first(outputs, first):
            self._note_progress(ctx, out)

    @staticmethod
    def _note_progress(ctx: RequestContext, out: Any) -> None:
        if ctx.first_token_s is None and any(len(o.token_ids) for o in out.outputs):
            ctx.first_token_s = time.monotonic()

    def _finish(self, ctx: RequestContext, subs: list[SubRequest]) -> None:
        """Record usage and latency metrics once the whole request has finished."""
        outs = [o for sub in subs if sub.last is not None for o in sub.last.outputs]
        ctx.completion_tokens = sum(len(o.token_ids) for o in outs)
        ctx.finish_reasons = [o.finish_reason or "unknown" for o in outs]
        e2e = time.monotonic() - ctx.arrival_s
        ttft = ctx.first_token_s - ctx.arrival_s if ctx.first_token_s is not None else None
        per_choice = ctx.completion_tokens // max(len(outs), 1)
        self.metrics.observe_request(
            ttft_s=ttft, e2e_s=e2e, num_generated=per_choice, finish_reasons=ctx.finish_reasons
        )

    @staticmethod
    def _usage(ctx: RequestContext) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            total_tokens=ctx.prompt_tokens + ctx.completion_tokens,
        )


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"

"""Per-choice deltas of the engine's outputs: the one stream every endpoint renders.

The engine's `RequestOutput`s are cumulative (text, token ids and logprobs so far, for each of a
request's `n` choices), and one HTTP request may run several engine requests (one per prompt).
`ChoiceDeltas` walks the merged outputs of an `EngineRun` and yields, per choice, what is new
since that choice's last delta. Tokens that add no text yet (a partial UTF-8 character, text
held back while it may still become a stop string) wait for the delta that has some, so a delta
has text unless it is its choice's last one (the one with the finish reason). The OpenAI
completions and chat endpoints and Anthropic's Messages API render these deltas as their stream
events; a whole response renders the sum of each choice's deltas (`ChoiceDeltas.whole`), so it
is exactly what the stream would have sent.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from xllm.engine.outputs import CompletionOutput, PromptLogprobs, RequestOutput, SampleLogprobs
from xllm.service.engine_client import EngineRun, SubRequest


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice added since its previous delta."""

    index: int  # the choice's index in the response: its prompt's choice_base + its index there
    sub: SubRequest  # the engine request (prompt) it belongs to
    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None  # one entry per new token, when logprobs were asked for
    finish_reason: str | None  # set on the choice's last delta
    stop_reason: int | str | None  # the stop string or token id that ended it, if one did
    first: bool  # the choice's first delta (where an echoed prompt goes)
    prompt_logprobs: PromptLogprobs | None = None  # on the first delta, when asked for

    def extend(self, later: ChoiceDelta) -> None:
        """Append a later delta of the same choice."""
        assert later.index == self.index
        self.text += later.text
        self.token_ids += later.token_ids
        if self.logprobs is not None and later.logprobs is not None:
            self.logprobs += later.logprobs
        self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason


@dataclass(slots=True)
class _Cursor:
    """How much of one choice's cumulative output its deltas have covered."""

    text_len: int = 0
    num_tokens: int = 0
    started: bool = False
    finished: bool = False


class ChoiceDeltas:
    """The deltas of one HTTP request's choices, an async iterator over its `EngineRun`.

    `start()` waits for the engine's first output; `aclose()` (or the end of `whole()`) closes the
    run, aborting whatever has not finished. The usage counts (`completion_tokens`,
    `finish_reasons`) come from each choice's latest output, whether or not a delta covered it.
    """

    def __init__(self, run: EngineRun) -> None:
        self._run = run
        self._outputs = run.outputs()
        self._cursors: dict[int, _Cursor] = {}
        self._ready: deque[ChoiceDelta] = deque()
        self._latest: dict[int, CompletionOutput] = {}  # each choice's latest cumulative output
        self._cached: dict[str, int] = {}  # per engine request: prompt tokens from the prefix cache
        self.first_token_s: float | None = None  # time.monotonic() of the first generated token
        self.kv_transfer_params: dict | None = None  # a prefill part's held-KV handle

    async def start(self) -> None:
        """Wait for the first output, so that an engine refusal (e.g. a too-long prompt) is still
        raised here, before a response has started, and gets its own HTTP status."""
        try:
            self._add(*await anext(self._outputs))
        except StopAsyncIteration:
            pass
        except BaseException:
            await self.aclose()
            raise

    def __aiter__(self) -> ChoiceDeltas:
        return self

    async def __anext__(self) -> ChoiceDelta:
        while not self._ready:
            self._add(*await anext(self._outputs))  # StopAsyncIteration once every request ended
        return self._ready.popleft()

    async def whole(self) -> list[ChoiceDelta]:
        """Each choice's deltas summed into one (its whole output as a first delta), by index;
        closes the run."""
        wholes: dict[int, ChoiceDelta] = {}
        try:
            async for delta in self:
                if delta.index in wholes:
                    wholes[delta.index].extend(delta)
                else:
                    wholes[delta.index] = delta
        finally:
            await self.aclose()
        return [wholes[i] for i in sorted(wholes)]

    async def aclose(self) -> None:
        """Close the run: the engine requests that have not finished are aborted."""
        await self._outputs.aclose()
        await self._run.close()

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self._latest.values())

    @property
    def cached_tokens(self) -> int:
        return sum(self._cached.values())

    @property
    def finish_reasons(self) -> list[str | None]:
        return [o.finish_reason for o in self._latest.values()]

    def final_output(self, index: int) -> CompletionOutput:
        """The latest cumulative output of choice `index` (its last, once the run has ended)."""
        output = self._latest.get(index)
        if output is None:
            raise RuntimeError(f"choice {index} of {self._run.subs[0].engine_request_id} has no output")
        return output

    def _add(self, sub: SubRequest, out: RequestOutput) -> None:
        """Queue the deltas of one cumulative output."""
        if self.first_token_s is None and any(o.token_ids for o in out.outputs):
            self.first_token_s = time.monotonic()
        self._cached[sub.engine_request_id] = out.num_cached_tokens
        if out.kv_transfer_params is not None:
            self.kv_transfer_params = out.kv_transfer_params
        for o in out.outputs:
            index = sub.choice_base + o.index
            self._latest[index] = o
            cur = self._cursors.get(index)
            if cur is None:
                # A resumed choice's stream already covered its resumed tokens and text.
                resumed = bool(sub.resume_ids)
                cur = self._cursors[index] = _Cursor(
                    text_len=sub.resume_text_offset, num_tokens=len(sub.resume_ids), started=resumed
                )
            if cur.finished:  # another choice of the same request is still going
                continue
            text = o.text[cur.text_len :]
            finished = o.finish_reason is not None
            if not text and not finished:
                continue  # its new tokens (if any) go with the next delta that has text
            self._ready.append(
                ChoiceDelta(
                    index=index,
                    sub=sub,
                    text=text,
                    token_ids=list(o.token_ids[cur.num_tokens :]),
                    logprobs=None if o.logprobs is None else list(o.logprobs[cur.num_tokens :]),
                    finish_reason=o.finish_reason,
                    stop_reason=o.stop_reason,
                    first=not cur.started,
                    prompt_logprobs=None if cur.started else out.prompt_logprobs,
                )
            )
            cur.text_len, cur.num_tokens, cur.started, cur.finished = (
                len(o.text),
                len(o.token_ids),
                True,
                finished,
            )

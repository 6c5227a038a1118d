"""A stand-in for `AsyncLLM` with the interface of docs/INTERFACES.md, for the server's unit tests.

It "generates" deterministic text one character-token at a time with a configurable delay, keeps
running/waiting/KV-block counts like the real engine would, and honours `abort`. The e2e tests
use the real engine; these only pin down the HTTP layer (schemas, errors, SSE, draining).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


class FakeTokenizer:
    """Characters are tokens: id = ord(c) + 3 (ids 0..2 are PAD, BOS, EOS)."""

    bos_token_id = 1
    eos_token_id = 2
    chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"

    def __len__(self) -> int:
        return 1000

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [min(ord(c), 996) + 3 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i - 3) for i in ids if i >= 3)

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False, **kw: Any
    ) -> str:
        if any(m["role"] == "tool" for m in messages):
            raise ValueError("tool messages are not supported by this template")
        out = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return out + ("<assistant>" if add_generation_prompt else "")


@dataclass
class FakeSamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k == 7:  # a value the fake "engine" rejects, to test ValueError -> 400
            raise ValueError("top_k=7 is not allowed by the fake engine")


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Any
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Any = None


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 100
    prefix_cache_hit_rate: float = 0.0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


class PromptTooLongError(ValueError):
    pass


@dataclass
class FakeEngineConfig:
    max_num_seqs: int


@dataclass
class FakeAsyncLLM:
    """Generates the text "abcdefghij..." cycling, one token per `delay_s`; max_num_seqs running."""

    delay_s: float = 0.0
    max_model_len: int = 256
    max_num_seqs: int = 64
    model_name: str = "fake-model"
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    _stats: EngineStats = field(default_factory=EngineStats)
    _aborted: set[str] = field(default_factory=set)
    _running: set[str] = field(default_factory=set)
    shut_down: bool = False
    generation_defaults: dict = field(default_factory=dict)
    last_params: FakeSamplingParams | None = None

    def default_sampling_params(self) -> FakeSamplingParams:
        return FakeSamplingParams(**self.generation_defaults)

    @property
    def config(self) -> FakeEngineConfig:
        return FakeEngineConfig(self.max_num_seqs)

    def stats(self) -> EngineStats:
        return self._stats

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def shutdown(self) -> None:
        self.shut_down = True

    async def generate(self, prompt: Any, params: FakeSamplingParams, request_id: str, priority: int = 0):
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        self.last_params = params
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt of {len(ids)} tokens is longer than {self.max_model_len}")
        s = self._stats
        s.num_waiting += 1
        try:
            while len(self._running) >= self.max_num_seqs:
                await asyncio.sleep(0.005)
                if request_id in self._aborted:
                    return
        finally:
            s.num_waiting -= 1
        self._running.add(request_id)
        s.num_running += 1
        blocks = 1 + len(ids) // 16
        s.kv_blocks_used += blocks
        s.prompt_tokens_total += len(ids)
        n = params.n
        token_ids: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[dict[int, Logprob]]] = [[] for _ in range(n)]
        try:
            for step in range(params.max_tokens):
                await asyncio.sleep(self.delay_s)
                if request_id in self._aborted:
                    yield RequestOutput(
                        request_id,
                        None,
                        ids,
                        None,
                        [
                            CompletionOutput(
                                i, self.tokenizer.decode(token_ids[i]), list(token_ids[i]), None, "abort"
                            )
                            for i in range(n)
                        ],
                        True,
                    )
                    return
                for i in range(n):
                    tid = ord("a") + (step + i) % 26 + 3
                    token_ids[i].append(tid)
                    lps[i].append(
                        {tid: Logprob(-0.5, 1, chr(tid - 3)), tid + 1: Logprob(-1.5, 2, chr(tid - 2))}
                    )
                s.generation_tokens_total += n
                done = step + 1 == params.max_tokens
                outs = []
                for i in range(n):
                    text = self.tokenizer.decode(token_ids[i])
                    reason = "length" if done else None
                    for st in params.stop or []:
                        if st in text:
                            text, reason, done = text[: text.index(st)], "stop", True
                    outs.append(
                        CompletionOutput(
                            i,
                            text,
                            list(token_ids[i]),
                            list(lps[i]) if params.logprobs is not None else None,
                            reason,
                        )
                    )
                plps = [None] + [{t: Logprob(-2.0, 1, chr(t - 3) if t >= 3 else "")} for t in ids[1:]]
                yield RequestOutput(
                    request_id, None, ids, plps if params.prompt_logprobs is not None else None, outs, done
                )
                if done:
                    return
        finally:
            self._running.discard(request_id)
            s.num_running -= 1
            s.kv_blocks_used -= blocks

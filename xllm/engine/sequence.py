"""Requests and their sequences: the state the scheduler moves between queues.

A request with ``n`` samples owns ``n`` sequences. Sequence 0 prefills the prompt; the others
are forked from it once the prompt is computed and share its full KV blocks (reference counted),
recomputing only the last partial block, so ``n > 1`` costs one prefill.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from xllm.engine.outputs import Logprob, PromptLogprobs, RequestMetrics, SampleLogprobs
from xllm.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill
    RUNNING = "running"
    HELD = "held"  # a sibling of n > 1 waiting for sequence 0's prompt to be computed
    FINISHED = "finished"


class Priority(enum.IntEnum):
    """Lower runs first: online traffic before offline batch work."""

    ONLINE = 0
    OFFLINE = 1


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    seed: int
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained digests of the full blocks, in order
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    prefix_hit_recorded: bool = False  # its prompt lookup is in the hit-rate statistics (once)
    text: str = ""
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detokenizer: object | None = None  # IncrementalDetokenizer, set by the engine
    # Guessed tokens at the end of `token_ids` for this step's verification (speculative
    # decoding); removed again before the step's results are applied.
    num_draft: int = 0
    # Async scheduling: placeholder tokens at the end of `token_ids` that a step in flight is
    # sampling; the scheduler counts them, nothing else may read them (see LLMEngine._launch).
    num_pending: int = 0
    # Guessing pauses after guesses that all missed (until this many output tokens), for longer
    # each time in a row: text that does not repeat costs a verification step for nothing.
    spec_resume_at: int = 0
    spec_backoff: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_pending]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def arrival_time(self) -> float:
        return self.request.metrics.arrival_time

    @property
    def params(self) -> SamplingParams:
        return self.request.params


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None
    error: str | None = None
    kv_hold: bool = False  # keep the prompt's KV for a decode instance when it ends (prefill role)
    kv_transfer_params: dict | None = None  # what the decode side needs to fetch the held KV

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def add_prompt_logprobs(self, entries: list[dict[int, Logprob] | None]) -> None:
        if self.prompt_logprobs is None:
            self.prompt_logprobs = []
        self.prompt_logprobs.extend(entries)

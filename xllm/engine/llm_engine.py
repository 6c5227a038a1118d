"""`LLMEngine`: the synchronous engine core that `LLM` and `AsyncLLM` drive.

It owns the request lifecycle in one place: admission (tokenise, validate, reject alone),
scheduling, one model step, and output processing (append tokens, detokenise, stop checks,
finish and free). Everything device-specific is behind the HAL backend: the one the config
names, opened through the registry, or a `Backend` instance the caller passed in.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from xllm.dtypes import torch_dtype
from xllm.engine.config import EngineConfig, chunked_prefill_error
from xllm.engine.detokenizer import IncrementalDetokenizer
from xllm.engine.errors import PromptTooLongError
from xllm.engine.faults import StepFaults, describe
from xllm.engine.kv_cache_manager import KVCacheManager
from xllm.engine.kv_cache_sizing import log_kv_cache_plan, plan_kv_cache
from xllm.engine.kv_handoff import HandoffStats, KVHandoff, KVSource
from xllm.engine.model_runner import ModelRunner, SampledToken, StepInputs, StepResult, prepare_inputs
from xllm.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.scheduler import ScheduledSequence, Scheduler
from xllm.engine.sequence import Request, Sequence, SequenceStatus
from xllm.engine.spec_decode import can_speculate, propose_ngram
from xllm.hal import Backend, get_backend

logger = logging.getLogger("xllm.engine")

_SEED_BITS = 63
MAX_SPEC_BACKOFF = 64  # output tokens a sequence goes without guesses after misses in a row

PromptInput = str | list[int] | dict

# Async scheduling: the token a step in flight is sampling, until it is known. Out of every
# vocabulary, so a placeholder that leaked into a forward pass would fail its embedding lookup.
PLACEHOLDER_TOKEN = -1


@dataclass(slots=True)
class _StepInFlight:
    """A step launched on the step thread (async scheduling) whose results are not applied yet."""

    scheduled: list[ScheduledSequence]
    result: Future[StepResult]


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_hit_rate: float
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int
    num_failed_steps: int = 0  # model steps that raised, over the engine's life
    kv_transfer: HandoffStats | None = None  # prefill/decode hand-off counters
    spec_draft_tokens: int = 0  # speculative decoding: guessed tokens verified
    spec_accepted_tokens: int = 0  # and kept

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from xllm.models import default_model_path, load_generation_config, load_model, load_tokenizer

        self.config = config
        # A Backend instance is used as given (its options are its own); a name goes to the registry.
        if isinstance(config.backend, Backend):
            self.backend = config.backend
        else:
            self.backend = get_backend(config.backend, **config.backend_options)
        model_path = str(config.model) if config.model is not None else str(default_model_path())
        self.model_path = model_path
        dtype = self._choose_dtype(model_path) if config.dtype == "auto" else torch_dtype(config.dtype)
        tp = config.tensor_parallel_size > 1
        if tp:  # the model lives in the worker processes; this handle stands in for it
            from xllm.engine.tp import TensorParallelExecutor

            self.model = TensorParallelExecutor(config, self.backend, model_path, dtype)
        else:
            self.model = load_model(model_path, self.backend, dtype=dtype, quantization=config.quantization)
        self.model_config = self.model.config
        self.tokenizer = load_tokenizer(config.tokenizer or model_path)
        self.generation_defaults = load_generation_config(model_path)
        self.eos_token_ids = self._eos_ids()

        mc = self.model_config
        self.block_size = config.block_size
        max_len = config.max_model_len or mc.max_position_embeddings
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                f"{mc.max_position_embeddings}"
            )
        draft_model = None  # speculative_model: loaded before the cache is sized, which it shares
        if config.speculative_model is not None:  # the config rules out tensor parallelism here
            from xllm.engine.draft_model import load_draft_model

            draft_model = load_draft_model(config.speculative_model, self.backend, dtype, mc.vocab_size)
        if tp:
            plan = self.model.plan_kv_cache(config, max_len)
        else:
            plan = plan_kv_cache(self.backend, self.model, config, max_len, draft_model)
        num_blocks = plan.num_blocks
        capacity = num_blocks * config.block_size
        if max_len > capacity:
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len {max_len} needs {-(-max_len // config.block_size)} KV blocks but the cache "
                    f"holds {num_blocks}; raise kv_cache_memory or lower max_model_len"
                )
            max_len = capacity
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_len:
            raise ValueError(chunked_prefill_error(config.max_num_batched_tokens, max_len))
        self.max_model_len = max_len
        log_kv_cache_plan(plan, config.block_size, max_len)
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill
        )
        if tp:  # each rank allocates the cache of its own KV heads
            self.kv_caches = []
            self.runner = self.model.start(plan.num_physical_blocks, self.max_model_len, self.eos_token_ids)
        else:
            self.kv_caches = self.backend.allocate_kv_cache(
                mc.num_layers,
                plan.num_physical_blocks,
                config.block_size,
                mc.num_kv_heads,
                mc.head_dim,
                self.model.dtype,
            )
            self.runner = ModelRunner(
                self.backend,
                self.model,
                self.kv_caches,
                config.block_size,
                self.max_model_len,
                config.max_num_seqs,
                tokenizer=self.tokenizer,
                use_graphs=config.use_graphs,
                capture_sizes=config.capture_sizes,
                eos_token_ids=self.eos_token_ids,
            )
        self.draft_proposer = None  # speculative_model: a draft model guesses (see _draft_tokens)
        if draft_model is not None:
            from xllm.engine.draft_model import DraftModelProposer

            self.draft_proposer = DraftModelProposer(
                self.backend,
                draft_model,
                block_size=config.block_size,
                num_blocks=num_blocks,  # one draft block per block of the target's context
                max_model_len=self.max_model_len,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                use_graphs=config.use_graphs,
            )
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(config.seed)
        self._seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.spec_draft_tokens = 0  # speculative decoding: guesses verified, and kept
        self.spec_accepted_tokens = 0
        self.faults = StepFaults(config.max_consecutive_step_failures)  # see step()
        # Prefill/decode hand-off; its transfer engine (a listening socket) starts on first use.
        self.handoff = KVHandoff(self.backend, self.kv_cache, lambda: self.kv_caches)
        self._received: list[Sequence] = []  # prompt KV received, waiting for a free seat
        # Async scheduling: one step runs on the step thread while the engine's thread schedules
        # the next one and builds the outputs of the last (see _step_async). The thread starts
        # on the first async step: the config may be switched between runs (the bench does).
        self._step_thread: ThreadPoolExecutor | None = None
        self._in_flight: _StepInFlight | None = None

    def _choose_dtype(self, model_path: str) -> torch.dtype:
        """dtype="auto": the checkpoint's dtype where the backend computes it natively, else
        float32 (a bfloat16 checkpoint on an AVX2-only CPU would run emulated, many times slower).
        An explicit dtype is always honoured."""
        from xllm.models import ModelConfig

        wanted = ModelConfig.from_pretrained(model_path).dtype or torch.float32
        native = self.backend.capabilities.native_dtypes
        if wanted in native:
            return wanted
        chosen = torch.float32 if torch.float32 in native else native[0]
        logger.info(
            "dtype auto: the checkpoint is %s, which the %s backend does not compute natively here; "
            "running in %s (pass dtype=%s to insist)",
            str(wanted).removeprefix("torch."),
            self.backend.name,
            str(chosen).removeprefix("torch."),
            str(wanted).removeprefix("torch."),
        )
        return chosen

    # ------------------------------------------------------------------ admission

    def add_request(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> Request:
        """Validates and queues a request; raises ValueError (nothing queued) on bad input."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params if params is not None else self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        resumed = self._resumed_ids(prompt, params)
        kv_hold, kv_source = self._kv_handoff_options(prompt, params, resumed)
        self._check_prompt(token_ids, len(resumed))
        remaining = self.max_model_len - len(token_ids)
        if params.max_tokens is None or params.max_tokens > remaining:
            params = params.model_copy(
                update={
                    "max_tokens": max(remaining, 1),
                    "min_tokens": min(params.min_tokens, max(remaining, 1)),
                }
            )
        request = Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=token_ids,
            params=params,
            priority=priority,
            metrics=RequestMetrics(
                arrival_time=arrival_time if arrival_time is not None else time.monotonic()
            ),
        )
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(_SEED_BITS)
        for i in range(params.n):
            # Sample i of a seeded request gets its own stream derived from the seed, so the n
            # samples differ yet each is reproducible.
            seed = base_seed if i == 0 else hash((base_seed, i)) & ((1 << _SEED_BITS) - 1)
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request=request,
                index=i,
                token_ids=list(token_ids),
                num_prompt_tokens=len(token_ids),
                seed=seed,
                logprobs=[] if params.logprobs is not None else None,
            )
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, params.skip_special_tokens, params.stop, params.include_stop_str_in_output
            )
            request.seqs.append(seq)
        if resumed:
            self._resume(request.seqs[0], resumed)
        request.kv_hold = kv_hold
        self.requests[request_id] = request
        if kv_source is None or not self.handoff.start_receive(request.seqs[0], kv_source):
            self.scheduler.add(request.seqs[0])
        for sibling in request.seqs[1:]:
            sibling.status = SequenceStatus.HELD  # forked from sequence 0 once the prompt is computed
        self.prompt_tokens_total += len(token_ids)
        return request

    def _resumed_ids(self, prompt: PromptInput, params: SamplingParams) -> list[int]:
        """A prompt dict's ``resume_token_ids``: output another engine already generated for this
        request (the router's failover, a prefill instance's hand-off). They count as output
        (max_tokens, min_tokens, penalties, the seeded sampler's step) and are prefilled with
        the prompt, so the continuation is the one an uninterrupted run would produce."""
        if not isinstance(prompt, dict) or not prompt.get("resume_token_ids"):
            return []
        if params.n != 1:
            raise ValueError("resuming a request needs n = 1")
        ids = self._validate_ids(list(prompt["resume_token_ids"]))
        if params.max_tokens is not None and len(ids) >= params.max_tokens:
            raise ValueError(
                f"{len(ids)} resumed tokens leave nothing to generate under max_tokens={params.max_tokens}"
            )
        return ids

    def _kv_handoff_options(
        self, prompt: PromptInput, params: SamplingParams, resumed: list[int]
    ) -> tuple[bool, KVSource | None]:
        """A prompt dict's ``kv_hold`` (prefill side: keep the prompt's KV for a decode instance)
        and ``kv_source`` (decode side: receive it; needs the prefill's token as resumed output)."""
        if not isinstance(prompt, dict):
            return False, None
        hold = bool(prompt.get("kv_hold"))
        source = prompt.get("kv_source")
        if (hold or source is not None) and params.n != 1:
            raise ValueError("prefill/decode hand-off needs n = 1")
        if (hold or source is not None) and self.config.tensor_parallel_size > 1:
            # The KV lives in the workers, sharded by head; the hand-off reads the engine's cache.
            raise ValueError("prefill/decode hand-off is not supported with tensor_parallel_size > 1")
        if source is not None:
            if not isinstance(source, KVSource):
                raise ValueError("kv_source must be a KVSource")
            if not resumed:
                raise ValueError(
                    "a request receiving its KV needs the prefill's token(s) as resume_token_ids"
                )
            if params.prompt_logprobs is not None:
                raise ValueError("prompt_logprobs need the prompt computed here, not received")
        return hold, source

    def _resume(self, seq: Sequence, token_ids: list[int]) -> None:
        """Replays resumed output tokens through the stop checks and the detokenizer (not the
        metrics: this engine did not generate them)."""
        params = seq.params
        for token in token_ids:
            seq.token_ids.append(token)
            may_stop = seq.num_output_tokens >= params.min_tokens
            ends = (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids
            if may_stop and ends:
                raise ValueError("the resumed tokens already end the request (a stop or EOS token)")
            if seq.detokenizer.add_token(token, check_stop=may_stop) is not None:
                raise ValueError("the resumed tokens already complete a stop string")
            if seq.logprobs is not None:
                seq.logprobs.append({})  # not this engine's to report; the stream already did
        if seq.num_tokens >= self.max_model_len:
            raise ValueError("the resumed tokens already fill the context")
        seq.text = seq.detokenizer.stable_text

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (as vLLM does)."""
        g = self.generation_defaults or {}
        fields = {}
        if g.get("do_sample") is False:
            fields["temperature"] = 0.0
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if key in g and g[key] is not None and key not in fields:
                fields[key] = g[key]
        try:
            return SamplingParams(**fields)
        except ValueError:
            return SamplingParams()

    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._validate_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
            raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)):
            return None, self._validate_ids(list(prompt))
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _validate_ids(self, ids: list) -> list[int]:
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("prompt must contain at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt token ids must be integers")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def _check_prompt(self, token_ids: list[int], num_resumed: int = 0) -> None:
        if not token_ids:
            raise ValueError("prompt must contain at least one token")
        total = len(token_ids) + num_resumed
        what = f"prompt has {len(token_ids)} tokens" + (
            f" (and {num_resumed} resumed)" if num_resumed else ""
        )
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"{what}, more than the maximum context length of {self.max_model_len} tokens"
            )
        if self.kv_cache.blocks_needed(total + 1) > self.kv_cache.num_blocks:
            raise PromptTooLongError(
                f"{what}, which do not fit the KV cache of {self.kv_cache.num_blocks * self.block_size} tokens"
            )

    # ------------------------------------------------------------------ abort

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finishes a request with reason "abort" and frees its blocks; None if it is unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort")
        return self._make_output(request)

    def fail_request(self, request_id: str, error: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is not None:
            request.error = error
        return self.abort_request(request_id)

    # ------------------------------------------------------------------ the step

    def has_unfinished_requests(self) -> bool:
        """Requests to run, or KV held for (or on its way from) another instance to look after."""
        return bool(self.requests) or self.handoff.has_work() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns an output for every request that advanced or finished.

        Raises `EngineDeadError` when the step kills the engine and on every call after that
        (see `_step_failed`).
        """
        self.faults.check_alive()
        if self.handoff.has_work() or self._received:
            self._admit_received()
        if self.config.async_scheduling or self._in_flight is not None:
            return self._step_async()
        drafted = self._draft_tokens() if self.config.num_speculative_tokens else []
        sched = self.scheduler.schedule()
        if drafted:
            self._fit_drafts(drafted, sched.scheduled)
        if sched.is_empty:
            return self._idle()
        self._mark_scheduled(sched.scheduled)
        try:
            result = self.runner.execute(sched.scheduled)
        except Exception as exc:
            return self._step_failed(exc, sched.scheduled)
        self.faults.record_success()
        return self._outputs(self._apply_step(sched.scheduled, result, launched=False))

    def _idle(self) -> list[RequestOutput]:
        if self.handoff.receiving:  # only transfers to wait for: do not spin
            self.handoff.wait(0.005)
        elif self.handoff.held and not self.requests:
            self.handoff.wait(0.02)
        return []

    @staticmethod
    def _mark_scheduled(scheduled: list[ScheduledSequence]) -> None:
        now = time.monotonic()
        for item in scheduled:
            m = item.seq.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now

    def _apply_step(
        self, scheduled: list[ScheduledSequence], result: StepResult, launched: bool
    ) -> dict[str, Request]:
        """Applies a step's results to its sequences; returns the requests that advanced.

        `launched`: the step went through `_launch`, which advanced the sequences already and
        left a placeholder where each samples its token."""
        now = time.monotonic()
        touched: dict[str, Request] = {}
        verified = result.verified or [None] * len(scheduled)
        for item, sampled, prompt_lp, checked in zip(
            scheduled, result.sampled, result.prompt_logprobs, verified, strict=True
        ):
            seq = item.seq
            request = seq.request
            if checked is not None:
                self._accept_drafts(seq, checked, now)
                touched[request.request_id] = request
                continue
            if not launched:
                seq.num_computed_tokens += item.num_new_tokens
            elif seq.is_finished:  # aborted while its step ran; its blocks are free already
                continue
            elif sampled is not None:
                assert seq.token_ids[-1] == PLACEHOLDER_TOKEN and seq.num_pending == 1
                seq.token_ids.pop()
                seq.num_pending = 0
            self.kv_cache.commit_computed_blocks(seq)
            if prompt_lp is not None:
                request.add_prompt_logprobs(prompt_lp)
            if sampled is not None:
                # Fork before appending: the first token may already finish sample 0 and free
                # the prompt blocks that its siblings are to share.
                if seq.index == 0 and len(request.seqs) > 1 and request.seqs[1].status is SequenceStatus.HELD:
                    self._fork_siblings(seq)
                self._append_token(seq, sampled, now)
                touched[request.request_id] = request
        return touched

    def _outputs(self, touched: dict[str, Request]) -> list[RequestOutput]:
        outputs = [self._make_output(r) for r in touched.values()]
        for r in touched.values():
            if r.is_finished:
                self.requests.pop(r.request_id, None)
        return outputs

    # ------------------------------------------------------------------ async scheduling

    def _step_async(self) -> list[RequestOutput]:
        """One step with the next one overlapped (`async_scheduling`).

        Step N runs on the step thread while this thread schedules step N+1: each sequence N
        samples for carries a placeholder token, so the scheduler allocates and orders as if N
        were done. Then N's tokens replace the placeholders (and finish what they finish), N+1
        is launched without the finished ones, and N's outputs are built while N+1 runs. Steps
        run one after another on one thread, so blocks freed while a step runs are rewritten
        only by later steps, and the tokens are exactly those of the synchronous engine.
        """
        if self._in_flight is None:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                return self._idle()
            self._mark_scheduled(sched.scheduled)
            self._in_flight = self._launch(sched.scheduled)
        # Switched off (between runs) with a step in flight: finish that one, launch nothing more.
        ahead = self.scheduler.schedule().scheduled if self.config.async_scheduling else []
        ahead_inputs = prepare_inputs(ahead, self.block_size) if ahead else None
        done, self._in_flight = self._in_flight, None
        try:
            result = done.result.result()
        except Exception as exc:
            return self._step_failed(exc, done.scheduled)  # the step ahead is scheduled again
        self.faults.record_success()
        touched = self._apply_step(done.scheduled, result, launched=True)
        live = [item for item in ahead if item.seq.status is SequenceStatus.RUNNING]
        if live:
            self._mark_scheduled(live)
            self._in_flight = self._launch(live, ahead_inputs if len(live) == len(ahead) else None)
        return self._outputs(touched)

    def _launch(self, scheduled: list[ScheduledSequence], inputs: StepInputs | None = None) -> _StepInFlight:
        """Starts a step on the step thread and advances its sequences as if it were done.

        `inputs`: prepared while the step before ran, whose sampled tokens are now filled in;
        prepared again when rows were dropped or prompt logprobs were counted (both changed
        since)."""
        if inputs is None or inputs.prompt_lp_rows:
            inputs = prepare_inputs(scheduled, self.block_size)
        else:
            _fill_placeholders(inputs, scheduled)
        # The step thread reads these while this thread grows the tables for the next step.
        inputs.block_tables = [list(table) for table in inputs.block_tables]
        # Read now: the steps and histories of the sequences move on before the step samples.
        sampling = self.runner.sampling_metadata(inputs.sampling_seqs) if inputs.sampling_seqs else None
        if self._step_thread is None:
            self._step_thread = ThreadPoolExecutor(1, "xllm-step")
        result = self._step_thread.submit(self.runner.execute_prepared, inputs, scheduled, True, sampling)
        for item in scheduled:
            seq = item.seq
            samples = item.completes_context
            seq.num_computed_tokens += item.num_new_tokens
            if samples:
                seq.token_ids.append(PLACEHOLDER_TOKEN)
                seq.num_pending = 1
        return _StepInFlight(scheduled, result)

    # ------------------------------------------------------------------ speculative decoding

    def _draft_tokens(self) -> list[Sequence]:
        """Appends guesses to the running greedy sequences: the draft model's when there is one
        (one batched call, see `draft_model`), else n-gram lookup's (see `spec_decode`)."""
        k = self.config.num_speculative_tokens
        drafted: list[Sequence] = []
        # Guesses must never cost another request its blocks (a preemption): only with room.
        if self.kv_cache.num_free_blocks < 2 * self.scheduler.num_running:
            return drafted
        eligible: list[Sequence] = []
        ks: list[int] = []
        for seq in self.scheduler.running:
            if seq.status is not SequenceStatus.RUNNING or not can_speculate(seq):
                continue
            if seq.num_output_tokens < seq.spec_resume_at:
                continue
            # Never guess past what the request may still produce: max_tokens and the context.
            room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
            if room > 0:
                eligible.append(seq)
                ks.append(min(k, room))
        if self.draft_proposer is not None:
            drafts = self.draft_proposer.propose(eligible, ks) if eligible else []
        else:
            n = self.config.speculative_ngram_max
            drafts = [propose_ngram(seq.token_ids, k_seq, n) for seq, k_seq in zip(eligible, ks, strict=True)]
        for seq, draft in zip(eligible, drafts, strict=True):
            if draft:
                seq.token_ids += draft
                seq.num_draft = len(draft)
                drafted.append(seq)
        return drafted

    def _fit_drafts(self, drafted: list[Sequence], scheduled: list[ScheduledSequence]) -> None:
        """Takes back the guesses the scheduler gave no room: all of them for a sequence it did not
        schedule (or preempted), the tail that its token budget cut off for one it did."""
        budget = {id(item.seq): item.num_new_tokens for item in scheduled}
        for seq in drafted:
            n = budget.get(id(seq))
            cut = seq.num_draft if n is None else seq.num_draft - min(seq.num_draft, n - 1)
            if cut:
                del seq.token_ids[len(seq.token_ids) - cut :]
                seq.num_draft -= cut
        self.spec_draft_tokens += sum(seq.num_draft for seq in drafted)

    def _accept_drafts(self, seq: Sequence, checked: list[SampledToken], now: float) -> None:
        """Keeps the guesses greedy decoding agrees with, then the model's own next token.

        `checked[i]` is the token sampled after row i of the step (row 0: the last real token).
        The KV of the kept guesses is valid; that of the others is overwritten later."""
        drafts = seq.token_ids[len(seq.token_ids) - seq.num_draft :]
        del seq.token_ids[len(seq.token_ids) - seq.num_draft :]
        seq.num_draft = 0
        kept = 0
        while kept < len(drafts) and checked[kept].token_id == drafts[kept]:
            kept += 1
        self.spec_accepted_tokens += kept
        if kept:
            seq.spec_backoff = 0
        else:
            seq.spec_backoff = min(2 * seq.spec_backoff or 1, MAX_SPEC_BACKOFF)
            seq.spec_resume_at = seq.num_output_tokens + 1 + seq.spec_backoff
        seq.num_computed_tokens = seq.num_tokens + kept  # the last real token and the kept guesses
        for token in checked[: kept + 1]:
            self._append_token(seq, token, now)
            if seq.is_finished:
                return
        self.kv_cache.commit_computed_blocks(seq)

    def _admit_received(self) -> None:
        """Sequences whose prompt KV arrived run from their first decode; those whose transfer
        failed are prefilled here instead."""
        ready, failed = self.handoff.poll()
        for seq in ready:
            seq.num_computed_tokens = seq.num_prompt_tokens
            self.kv_cache.commit_computed_blocks(seq)
            self.kv_cache.record_prefix_hit(seq)
        # They hold their blocks already, but a seat only when one is free (max_num_seqs).
        self._received += ready
        while self._received and self.scheduler.num_running < self.scheduler.max_num_seqs:
            self.scheduler.add_running(self._received.pop(0))
        for seq, why in failed:
            logger.warning("%s; prefilling request %s here instead", why, seq.request.request_id)
            self.kv_cache.free(seq)
            self.scheduler.add(seq)

    def _step_failed(self, exc: Exception, scheduled: list[ScheduledSequence]) -> list[RequestOutput]:
        """Handles a model step that raised.

        Usually the failure is charged to the step's own requests and the engine keeps serving.
        When the backend calls the error fatal, or it is the `max_consecutive_step_failures`-th
        in a row, the device cannot be trusted any more: every request fails (its blocks freed)
        and `EngineDeadError`, caused by `exc`, goes to whoever drives the engine.
        """
        dead = self.faults.record_failure(exc, fatal=self.backend.is_fatal_error(exc))
        if dead is None:
            logger.error(
                "model step failed (%d in a row, limit %d); failing its %d sequences",
                self.faults.consecutive,
                self.faults.max_consecutive,
                len(scheduled),
                exc_info=exc,
            )
            failed = {item.seq.request.request_id for item in scheduled}
            message = describe(exc)
            return [out for rid in failed if (out := self.fail_request(rid, message)) is not None]
        logger.critical("%s; failing all %d requests", dead, len(self.requests), exc_info=exc)
        for request_id in list(self.requests):
            self.fail_request(request_id, str(dead))
        raise dead from exc

    def _fork_siblings(self, parent: Sequence) -> None:
        """Gives the other samples of an n > 1 request the prompt's full blocks; each recomputes
        only the last partial block (at least one token, whose logits it samples from)."""
        shared = ((parent.num_prompt_tokens - 1) // self.block_size) * self.block_size
        for child in parent.request.seqs[1:]:
            self.kv_cache.share_prefix(parent, child, shared)
            child.num_cached_tokens = parent.num_cached_tokens
            self.scheduler.add_running(child)

    def _append_token(self, seq: Sequence, sampled: SampledToken, now: float) -> None:
        token = sampled.token_id
        seq.token_ids.append(token)
        self.generation_tokens_total += 1
        m = seq.request.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if seq.logprobs is not None and sampled.logprobs is not None:
            seq.logprobs.append(sampled.logprobs)
        params = seq.params
        n_out = seq.num_output_tokens
        may_stop = n_out >= params.min_tokens  # before min_tokens no stop condition applies
        is_eos = may_stop and not params.ignore_eos and token in self.eos_token_ids
        is_stop_id = may_stop and token in params.stop_token_ids
        if (is_eos or is_stop_id) and not params.include_stop_str_in_output:
            # As in vLLM, the stop token stays in token_ids but its text is not part of the output.
            return self._finish(seq, "stop", None if is_eos else token)
        # Before min_tokens a stop string must not cut the text either.
        stop_str = seq.detokenizer.add_token(token, check_stop=may_stop)
        seq.text = seq.detokenizer.stable_text  # the full text once finished (see _finish)
        if may_stop:
            if is_eos:
                return self._finish(seq, "stop")
            if is_stop_id:
                return self._finish(seq, "stop", token)
            if stop_str is not None:
                return self._finish(seq, "stop", stop_str)
        if n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.num_pending:  # aborted while a step samples its next token: that token is dropped
            del seq.token_ids[len(seq.token_ids) - seq.num_pending :]
            seq.num_pending = 0
        if self.draft_proposer is not None:
            self.draft_proposer.release(seq)
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if not isinstance(stop_reason, str):  # a stop string cut the text; otherwise it is all there
            seq.detokenizer.flush()
        seq.text = seq.detokenizer.text
        if seq.request.kv_hold and reason == "length" and seq.num_computed_tokens >= seq.num_prompt_tokens:
            seq.request.kv_transfer_params = self.handoff.hold(seq)
        if self.handoff.cancel(seq):  # aborted while its KV was on the way
            self.kv_cache.free(seq)
        elif seq in self._received:  # aborted with its KV here, before it got a seat
            self._received.remove(seq)
            self.kv_cache.free(seq)
        elif seq.status is not SequenceStatus.HELD:
            self.scheduler.remove(seq)
        else:
            assert not seq.block_table
        seq.status = SequenceStatus.FINISHED
        if seq.request.is_finished:
            seq.request.metrics.finished_time = time.monotonic()

    def _make_output(self, request: Request) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=s.output_token_ids,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in request.seqs
        ]
        request.metrics.num_cached_tokens = request.seqs[0].num_cached_tokens
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outputs,
            finished=request.is_finished,
            prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs is not None else None,
            metrics=request.metrics,
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            error=request.error,
            kv_transfer_params=request.kv_transfer_params,
        )

    # ------------------------------------------------------------------ introspection

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=self.kv_cache.num_used_blocks,
            kv_blocks_total=self.kv_cache.num_blocks,
            prefix_cache_hit_rate=self.kv_cache.stats.hit_rate,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
            num_failed_steps=self.faults.total,
            kv_transfer=self.handoff.snapshot(),
            spec_draft_tokens=self.spec_draft_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens,
        )

    def cached_block_digests(self, limit: int) -> list[bytes]:
        """Digests of the prefix cache's full blocks, most recently used first (see
        `KVCacheManager.cached_block_digests`, safe to call from another thread)."""
        return self.kv_cache.cached_block_digests(limit)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (
            getattr(self.model_config, "eos_token_ids", None),
            self.generation_defaults.get("eos_token_id"),
        ):
            if source is None:
                continue
            ids.update(source if isinstance(source, (list, tuple, set)) else [source])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return {int(i) for i in ids}


def _fill_placeholders(inputs: StepInputs, scheduled: list[ScheduledSequence]) -> None:
    """Puts the tokens that the previous step sampled into the rows prepared before they were known."""
    ids = inputs.input_ids
    starts = inputs.query_start_loc
    for row, token in enumerate(ids):
        if token == PLACEHOLDER_TOKEN:
            seq = scheduled[bisect.bisect_right(starts, row) - 1].seq
            ids[row] = seq.token_ids[inputs.positions[row]]
            if ids[row] == PLACEHOLDER_TOKEN:
                raise RuntimeError(f"sequence {seq.seq_id} was launched before its previous token was known")

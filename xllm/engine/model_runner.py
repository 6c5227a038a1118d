"""`ModelRunner`: turns a scheduled step into flat tensors, runs the model, samples.

The batch is flattened: every scheduled sequence contributes its new tokens to one [T] vector,
and `AttentionMetadata` tells the attention op where each sequence's tokens and KV blocks are.
Steps made only of single-token queries (decodes) go through the backend's `GraphRunner`, padded
to a capture-size bucket; other steps run eagerly. Only the last token of a sequence that
reaches the end of its known tokens is sampled (a chunk in the middle of a prompt samples nothing).

`execute` runs a step in parts of one concern each: `_prepare_inputs` flattens it into host
lists (`StepInputs`), `_forward` replays a graph or runs eagerly, `_sample` and
`_prompt_logprobs` turn logits into results. The host lists of the lengths go into the
attention metadata as its host copies, so backends never read them back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xllm.engine.outputs import Logprob
from xllm.engine.scheduler import ScheduledSequence
from xllm.engine.sequence import Sequence
from xllm.hal import AttentionMetadata, Backend, GraphInput, SamplingMetadata

# Greedy rows use no randomness; 64-bit seeds are folded into torch's int64 range.
_SEED_MASK = (1 << 63) - 1


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprobs: dict[int, Logprob] | None = None


@dataclass(slots=True)
class StepResult:
    # One entry per scheduled sequence, aligned with the scheduler output: None when the step
    # computed part of a prompt and sampled nothing.
    sampled: list[SampledToken | None]
    # Prompt logprobs computed this step, per scheduled sequence (None when not requested).
    prompt_logprobs: list[list[dict[int, Logprob] | None] | None]
    # Speculative decoding: per scheduled sequence with draft tokens, the token sampled after
    # each of its rows (its last real token, then each draft); None for the others.
    verified: list[list[SampledToken] | None] = field(default_factory=list)


# One sequence's prompt-logprob rows this step: (scheduled index, flat token rows, the prompt
# token ids those rows score, whether the None entry of prompt token 0 comes first).
PromptLogprobRows = tuple[int, list[int], list[int], bool]


@dataclass(slots=True)
class StepInputs:
    """One scheduled step flattened on the host, before any tensor is built.

    The lists are what the device tensors are made from; `query_start_loc` and `seq_lens` also
    go to the attention metadata as its host copies, so no backend reads them back.
    """

    input_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    slot_mapping: list[int] = field(default_factory=list)  # [T]
    query_start_loc: list[int] = field(default_factory=lambda: [0])  # [B + 1]
    seq_lens: list[int] = field(default_factory=list)  # [B]
    # [B] the sequences' own (ragged) block tables, not copied
    block_tables: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # flat token row each sampled sequence reads
    sample_indices: list[int] = field(default_factory=list)  # scheduled index of each sampled sequence
    sampling_seqs: list[Sequence] = field(default_factory=list)
    prompt_lp_rows: list[PromptLogprobRows] = field(default_factory=list)
    # Sequences verifying draft tokens: (scheduled index, every row of its chunk).
    verify_rows: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def all_decodes(self) -> bool:
        """Every sequence brings one token (each brings at least one)."""
        return len(self.input_ids) == len(self.seq_lens)


class ModelRunner:
    def __init__(
        self,
        backend: Backend,
        model,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        tokenizer=None,
        use_graphs: bool = True,
        capture_sizes: list[int] | None = None,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        device_index: int = 0,  # a tensor-parallel rank's device
    ) -> None:
        self.backend = backend
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.vocab_size = model.config.vocab_size
        # Ids beyond the logits (a tokenizer's EOS outside a padded vocab) can never be sampled.
        self.eos_token_ids = sorted(t for t in eos_token_ids if 0 <= t < self.vocab_size)
        self.tokenizer = tokenizer
        self.device = backend.device(device_index)
        self.scale = model.attention_scale
        self.sliding_window = model.sliding_window
        self._arange = torch.arange(max(max_num_seqs, 1) + 1, dtype=torch.int32, device=self.device)
        self.graph_runner = None
        if use_graphs:
            self.graph_runner = backend.create_graph_runner(
                self._decode_step,
                {
                    "input_ids": GraphInput(torch.int64),
                    "positions": GraphInput(torch.int64),
                    "slot_mapping": GraphInput(torch.int64, pad_value=-1),
                    "seq_lens": GraphInput(torch.int32, pad_value=1),
                    "block_tables": GraphInput(torch.int32, (self.max_blocks_per_seq,)),
                },
                capture_sizes=capture_sizes,
                max_batch_size=max_num_seqs,
            )
            if backend.capabilities.graph_capture:
                self.graph_runner.capture()

    # ------------------------------------------------------------------ forward passes

    def _decode_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """One decode token per row -> logits; the function a GraphRunner captures per bucket."""
        num_seqs = input_ids.shape[0]
        metadata = AttentionMetadata(
            query_start_loc=self._arange[: num_seqs + 1],
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            max_query_len=1,
            # A captured graph cannot see this step's lengths, so it is sized for the longest.
            max_seq_len=self.max_model_len,
            scale=self.scale,
            sliding_window=self.sliding_window,
            # Host copies must hold at every replay (see AttentionMetadata's graph rule): the
            # query layout of a decode bucket is fixed, its lengths change at every step.
            query_start_loc_host=list(range(num_seqs + 1)),
            seq_lens_host=None,
        )
        hidden = self.model.forward(input_ids, positions, self.kv_caches, metadata)
        return self.model.compute_logits(hidden)

    def execute(self, scheduled: list[ScheduledSequence]) -> StepResult:
        """One engine step: host inputs -> forward pass -> sampled tokens and prompt logprobs."""
        return self.execute_prepared(self._prepare_inputs(scheduled), scheduled)

    def execute_prepared(
        self,
        inputs: StepInputs,
        scheduled: list[ScheduledSequence],
        sample: bool = True,
        sampling: SamplingMetadata | None = None,
    ) -> StepResult | None:
        """`execute` after `_prepare_inputs`: a tensor-parallel worker gets `inputs` from the
        driver. `sample=False` (the ranks other than 0) runs the forward pass only, whose
        collectives every rank must join, and returns None. `sampling`: the sampled rows'
        metadata, built beforehand by `sampling_metadata` (async scheduling builds it before the
        sequences move on to the next step)."""
        logits, prompt_logits, verify_logits = self._forward(inputs)
        if not sample:
            return None
        sampled: list[SampledToken | None] = [None] * len(scheduled)
        if inputs.sampling_seqs:
            tokens = self._sample(logits, inputs.sampling_seqs, sampling)
            for i, token in zip(inputs.sample_indices, tokens, strict=True):
                sampled[i] = token
        prompt_logprobs: list[list[dict[int, Logprob] | None] | None] = [None] * len(scheduled)
        if inputs.prompt_lp_rows:
            prompt_logprobs = self._prompt_logprobs(
                scheduled, inputs.prompt_lp_rows, prompt_logits, prompt_logprobs
            )
        verified: list[list[SampledToken] | None] = [None] * len(scheduled)
        offset = 0
        for idx, rows in inputs.verify_rows:
            # Each row through the ordinary sampler, so a kept token is exactly what decoding
            # one token at a time would have sampled there.
            seq = scheduled[idx].seq
            verified[idx] = self._sample(verify_logits[offset : offset + len(rows)], [seq] * len(rows))
            offset += len(rows)
        return StepResult(sampled, prompt_logprobs, verified)

    def _prepare_inputs(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        return prepare_inputs(scheduled, self.block_size)

    def _forward(
        self, inputs: StepInputs
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Logits of the sampled rows, of the prompt-logprob rows and of the rows verifying draft
        tokens (None where there are none).

        Decode-only steps and steps verifying draft tokens replay the bucket's graph, one row per
        token; any other step (prefill chunks, a batch past the largest bucket, prompt logprobs,
        which need every row's logits) runs eagerly.
        """
        runner = self.graph_runner
        if runner is None or inputs.prompt_lp_rows:
            return self._forward_eager(inputs)
        if (inputs.all_decodes or inputs.verify_rows) and runner.bucket_for(
            len(inputs.input_ids)
        ) is not None:
            return self._replay_rows(inputs)
        return self._forward_eager(inputs)

    def _replay_rows(self, inputs: StepInputs) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        """A decode step, or one verifying draft tokens, through the decode graphs (the runner
        pads to the bucket): each token is a row of its own that attends to its sequence's first
        `position + 1` tokens. Every layer writes the whole step's KV before it attends, so the
        rows of one sequence see each other's keys as a causal chunk would."""
        qsl = inputs.query_start_loc
        tables = inputs.block_tables
        if not inputs.all_decodes:
            tables = [t for t, a, b in zip(tables, qsl[:-1], qsl[1:], strict=True) for _ in range(b - a)]
        logits = self.graph_runner.run(
            input_ids=self._tensor(inputs.input_ids, torch.int64),
            positions=self._tensor(inputs.positions, torch.int64),
            slot_mapping=self._tensor(inputs.slot_mapping, torch.int64),
            seq_lens=self._tensor([p + 1 for p in inputs.positions], torch.int32),
            block_tables=_block_tables(tables, self.max_blocks_per_seq).to(self.device),
        )
        rows = inputs.sample_rows
        sampled = None
        if rows:  # a decode step samples every row, in order: no gather
            sampled = (
                logits if len(rows) == len(inputs.input_ids) else logits[self._tensor(rows, torch.int64)]
            )
        verify = None
        if inputs.verify_rows:
            verify = logits[self._tensor([r for _, rs in inputs.verify_rows for r in rs], torch.int64)]
        return sampled, None, verify

    def _forward_eager(
        self, inputs: StepInputs
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        hidden = self.model.forward(
            self._tensor(inputs.input_ids, torch.int64),
            self._tensor(inputs.positions, torch.int64),
            self.kv_caches,
            self._eager_metadata(inputs),
        )
        rows = inputs.sample_rows
        logits = self.model.compute_logits(hidden[self._tensor(rows, torch.int64)]) if rows else None
        prompt_logits = None
        if inputs.prompt_lp_rows:
            rows = [r for _, rs, _, _ in inputs.prompt_lp_rows for r in rs]
            if rows:
                prompt_logits = self.model.compute_logits(hidden[self._tensor(rows, torch.int64)])
        verify_logits = None
        if inputs.verify_rows:
            rows = [r for _, rs in inputs.verify_rows for r in rs]
            verify_logits = self.model.compute_logits(hidden[self._tensor(rows, torch.int64)])
        return logits, prompt_logits, verify_logits

    def _eager_metadata(self, inputs: StepInputs) -> AttentionMetadata:
        """Attention metadata of an eager step, with the host copies of its lengths."""
        qsl, seq_lens = inputs.query_start_loc, inputs.seq_lens
        width = max(len(table) for table in inputs.block_tables)
        return AttentionMetadata(
            query_start_loc=self._tensor(qsl, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=_block_tables(inputs.block_tables, width).to(self.device),
            slot_mapping=self._tensor(inputs.slot_mapping, torch.int64),
            max_query_len=max(b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)),
            max_seq_len=max(seq_lens),
            scale=self.scale,
            sliding_window=self.sliding_window,
            query_start_loc_host=qsl,
            seq_lens_host=seq_lens,
        )

    def _tensor(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        """A device tensor from a host list (built on the host, then one copy to the device)."""
        return torch.tensor(values, dtype=dtype).to(self.device)

    # ------------------------------------------------------------------ sampling

    def sampling_metadata(self, seqs: list[Sequence]) -> SamplingMetadata:
        """What the sampler needs of `seqs` (their params, seeds, steps, penalty histories and
        min_tokens bans), read from the sequences as they are now."""
        params = [s.params for s in seqs]
        any_penalty = any(p.uses_penalties for p in params)
        return SamplingMetadata.from_lists(
            temperature=[p.temperature for p in params],
            top_k=[p.top_k for p in params],
            top_p=[p.top_p for p in params],
            min_p=[p.min_p for p in params],
            seeds=[s.seed & _SEED_MASK for s in seqs],
            steps=[s.num_output_tokens for s in seqs],
            repetition_penalty=[p.repetition_penalty for p in params],
            presence_penalty=[p.presence_penalty for p in params],
            frequency_penalty=[p.frequency_penalty for p in params],
            prompt_token_ids=[s.prompt_token_ids for s in seqs] if any_penalty else None,
            output_token_ids=[s.output_token_ids for s in seqs] if any_penalty else None,
            vocab_size=self.vocab_size,
            max_num_logprobs=max((p.logprobs if p.logprobs is not None else -1) for p in params),
            banned_token_ids=self._min_tokens_bans(seqs),
            device=self.device,
        )

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], metadata: SamplingMetadata | None = None
    ) -> list[SampledToken]:
        metadata = metadata if metadata is not None else self.sampling_metadata(seqs)
        max_lp = metadata.max_num_logprobs
        out = self.backend.sample(logits, metadata)
        token_ids = out.sampled_token_ids.tolist()
        if max_lp < 0:
            return [SampledToken(t) for t in token_ids]
        # Rank of the chosen token among the raw logits (1 = most likely), as OpenAI reports it.
        chosen = out.sampled_token_ids.view(-1, 1)
        ranks = ((logits.float() > logits.float().gather(1, chosen)).sum(dim=1) + 1).tolist()
        sampled_lp = out.sampled_logprobs.tolist()
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else [[] for _ in seqs]
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else [[] for _ in seqs]
        result = []
        for i, (seq, tok) in enumerate(zip(seqs, token_ids, strict=True)):
            k = seq.params.logprobs
            if k is None:
                result.append(SampledToken(tok))
                continue
            entry = {tok: Logprob(sampled_lp[i], ranks[i], self._decode(tok))}
            for rank, (tid, lp) in enumerate(zip(top_ids[i][:k], top_lp[i][:k], strict=True), start=1):
                entry.setdefault(tid, Logprob(lp, rank, self._decode(tid)))
            result.append(SampledToken(tok, entry))
        return result

    def _min_tokens_bans(self, seqs: list[Sequence]) -> list[list[int]] | None:
        """Per row, the ids that may not be sampled yet: until `min_tokens` tokens are out, EOS
        (unless `ignore_eos`) and every stop token id (vLLM's and transformers' semantics)."""
        bans: list[list[int]] | None = None
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens >= p.min_tokens:
                continue
            ids = [t for t in p.stop_token_ids if t < self.vocab_size]
            if not p.ignore_eos:
                ids.extend(self.eos_token_ids)
            if ids:
                bans = bans if bans is not None else [[] for _ in seqs]
                bans[i] = sorted(set(ids))
        return bans

    def _prompt_logprobs(self, scheduled, prompt_lp_rows, logits, out):
        if logits is None:
            for idx, _, _, with_first in prompt_lp_rows:
                out[idx] = [None] if with_first else []
            return out
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        offset = 0
        for idx, rows, targets, with_first in prompt_lp_rows:
            seq = scheduled[idx].seq
            k = seq.params.prompt_logprobs
            block = logprobs[offset : offset + len(rows)]
            offset += len(rows)
            # The first prompt token has no context to be predicted from: OpenAI reports None.
            entries: list[dict[int, Logprob] | None] = [None] if with_first else []
            if rows:
                tgt = torch.tensor(targets, dtype=torch.int64, device=block.device).view(-1, 1)
                chosen = block.gather(1, tgt).view(-1)
                ranks = ((block > chosen.view(-1, 1)).sum(dim=1) + 1).tolist()
                top_lp, top_ids = block.topk(k, dim=-1) if k > 0 else (None, None)
                chosen_l = chosen.tolist()
                for j, t in enumerate(targets):
                    entry = {t: Logprob(chosen_l[j], ranks[j], self._decode(t))}
                    if k > 0:
                        for r, (tid, lp) in enumerate(
                            zip(top_ids[j].tolist(), top_lp[j].tolist(), strict=True), start=1
                        ):
                            entry.setdefault(tid, Logprob(lp, r, self._decode(tid)))
                    entries.append(entry)
            out[idx] = entries
        return out

    def _decode(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None


def prepare_inputs(scheduled: list[ScheduledSequence], block_size: int) -> StepInputs:
    """Flattens the scheduled sequences' new tokens into host lists (no tensors yet)."""
    bs = block_size
    inputs = StepInputs()
    input_ids, positions, slots = inputs.input_ids, inputs.positions, inputs.slot_mapping
    query_start, seq_lens = inputs.query_start_loc, inputs.seq_lens
    for idx, item in enumerate(scheduled):
        seq, n = item.seq, item.num_new_tokens
        start = seq.num_computed_tokens
        table = seq.block_table
        row0 = len(input_ids)
        input_ids.extend(seq.token_ids[start : start + n])
        positions.extend(range(start, start + n))
        slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        query_start.append(query_start[-1] + n)
        seq_lens.append(start + n)
        inputs.block_tables.append(table)
        if seq.num_draft and item.completes_context:
            inputs.verify_rows.append((idx, list(range(row0, row0 + n))))
        elif item.completes_context:
            inputs.sample_rows.append(row0 + n - 1)
            inputs.sample_indices.append(idx)
            inputs.sampling_seqs.append(seq)
        if seq.params.prompt_logprobs is not None and seq.index == 0:
            rows = _prompt_logprob_rows(idx, seq, start, n, row0)
            if rows is not None:
                inputs.prompt_lp_rows.append(rows)
    return inputs


def _prompt_logprob_rows(idx: int, seq: Sequence, start: int, n: int, row0: int) -> PromptLogprobRows | None:
    """The rows of a step's chunk [start, start + n) of `seq` that score its prompt tokens.

    Row p's logits predict token p + 1; only prompt tokens are scored here. Entry j of the
    request's prompt logprobs scores token j (entry 0 is None). Entries already reported, before a
    preemption made the prompt be recomputed, are not repeated, and the siblings of n > 1 report
    none: the prompt is the request's. None when the chunk has nothing to report.
    """
    have = len(seq.request.prompt_logprobs or [])
    first = max(start, have - 1)
    last = min(start + n, seq.num_prompt_tokens - 1)
    if have != 0 and first >= last:
        return None
    rows = [row0 + p - start for p in range(first, last)]
    return idx, rows, seq.token_ids[first + 1 : last + 1], have == 0


def _block_tables(tables: list[list[int]], width: int) -> torch.Tensor:
    """[B, width] int32 block tables padded with block 0, built in one tensor construction."""
    return torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.int32)

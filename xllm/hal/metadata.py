"""Metadata that travels with a batch into the HAL attention and sampling ops.

Both dataclasses are defined here, above every backend, so that the CPU reference, the Triton
kernels and the Ascend fused operators all read exactly the same description of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Describes one mixed batch of B sequences flattened into T query tokens.

    Sequence i owns query tokens ``query_start_loc[i]:query_start_loc[i+1]``; they are its *last*
    ``query_len_i`` tokens, so with ``seq_len_i = seq_lens[i]`` the query token j of sequence i
    sits at position ``seq_len_i - query_len_i + j`` and attends causally to keys ``0..position``
    (a prefill chunk sees its cached prefix plus its own earlier tokens; a decode has query_len 1).

    The keys and values of *all* context tokens, the new ones included, are read from the paged
    cache: callers write the new tokens with ``reshape_and_cache`` (using ``slot_mapping``) before
    calling ``attention``. Token t of a sequence lives in block ``block_tables[i, t // block_size]``
    at offset ``t % block_size``.

    Padding rows (graph replay pads a decode batch up to its bucket) are ordinary one-token
    sequences with ``seq_len`` 1 over block 0 and slot -1: no backend needs a special case, and
    their outputs are ignored. Block 0 is the null block: the engine never gives it to a
    sequence, so a backend whose cache-write operator cannot skip slot -1 may write padding
    rows' K/V anywhere in block 0 (the Ascend graph path writes slot 0); its contents are
    undefined and never read for a real token. Unused block-table entries also point at it.

    Host copies. ``query_start_loc_host`` and ``seq_lens_host`` hold the same values as the two
    tensors, as Python lists, for backends whose operators take lengths on the host (Ascend's
    FIA takes ``actual_seq_lengths`` lists; the CPU reference groups decode rows by length).
    They are optional for callers; the engine and the conformance suite fill them, since they
    built the tensors from those lists. Backends read them through `host_query_start_loc` /
    `host_seq_lens`, which fall back to one device read when a copy is absent and keep it for
    the other layers of the step. So a metadata object describes one step: a caller that
    rewrites the tensors in place builds a new one (as the engine does) or updates the copies.

    Graph rule. A captured graph replays its device work only: host values seen at capture are
    frozen into it. Inside a function a `GraphRunner` captures, callers give only host copies
    fixed per bucket (the engine's decode step: ``query_start_loc_host = [0, 1, ..., B]``, and
    ``seq_lens_host = None`` because the lengths change at every replay), and a backend that
    captures graphs must not read host lengths while capturing (CUDA's kernels read only the
    tensors; Ascend switches to its device-tensor attention path). Backends that re-run the
    function eagerly at replay (the CPU's graph runner) see fresh values at every step.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative query lengths, starts at 0
    seq_lens: torch.Tensor  # [B] int32, context length including the new tokens
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, physical block ids
    slot_mapping: torch.Tensor  # [T] int64, cache slot per new token (block * block_size + offset), -1 = skip
    max_query_len: int  # host-side bounds, so kernels can size grids without a device sync
    max_seq_len: int
    scale: float  # softmax scale, usually head_dim ** -0.5
    sliding_window: int | None = None  # a query at position p sees keys in (p - window, p]
    # Host copies of the two tensors above (see "Host copies"); None: not given.
    query_start_loc_host: list[int] | None = None  # [B + 1]
    seq_lens_host: list[int] | None = None  # [B]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    def host_query_start_loc(self) -> list[int]:
        """``query_start_loc`` as a host list: the given copy, else one device read, kept."""
        if self.query_start_loc_host is None:
            self.query_start_loc_host = self.query_start_loc.tolist()
        return self.query_start_loc_host

    def host_seq_lens(self) -> list[int]:
        """``seq_lens`` as a host list: the given copy, else one device read, kept.

        The only place a backend reads lengths back from the device; never call it while a graph
        is being captured (see "Graph rule").
        """
        if self.seq_lens_host is None:
            self.seq_lens_host = self.seq_lens.tolist()
        return self.seq_lens_host


@dataclass(slots=True)
class SamplingMetadata:
    """Per-row sampling controls for a batch of B logits rows, as device tensors.

    Processing order (the order Hugging Face's logits processors use, so parity is checkable):
    banned tokens -> penalties -> temperature -> top-k -> top-p -> min-p -> sample. Rows with
    temperature 0 are greedy: argmax of the penalised logits, no truncation. Banned tokens
    (``banned``: the EOS and stop ids of a request that has not reached ``min_tokens``, as vLLM's
    and transformers' min-tokens processors do) get -inf before anything else, for greedy rows
    too; logprobs still come from the raw logits.

    Randomness is stateless per row: row i draws with a generator seeded from
    ``(seeds[i], steps[i])`` where ``steps[i]`` counts the tokens the request has already sampled.
    The same request with the same seed therefore samples the same tokens alone or inside any
    batch, across preemption, and inside a captured graph. The engine gives unseeded requests a
    seed from its own seeded RNG.
    """

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] int32, <= 0 disables
    top_p: torch.Tensor  # [B] float32, 1.0 disables
    min_p: torch.Tensor  # [B] float32, 0.0 disables
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, tokens sampled so far by the row's request
    repetition_penalty: torch.Tensor  # [B] float32, 1.0 disables (applies to prompt + output tokens)
    presence_penalty: torch.Tensor  # [B] float32, 0.0 disables (output tokens only)
    frequency_penalty: torch.Tensor  # [B] float32, 0.0 disables (output tokens only)
    # Token histories padded with vocab_size (an id no row holds); None when no row uses penalties.
    prompt_token_ids: torch.Tensor | None = None  # [B, max_prompt_len] int64
    output_token_ids: torch.Tensor | None = None  # [B, max_output_len] int64
    max_num_logprobs: int = -1  # -1: no logprobs; k >= 0: sampled token's logprob plus top-k
    # [N, 2] int64 (row, token id) pairs that must not be sampled this step; None when none are.
    banned: torch.Tensor | None = None
    # Host-side summaries so backends can take fast paths without reading device tensors.
    all_greedy: bool = False
    no_penalties: bool = True
    no_top_k: bool = True
    no_top_p: bool = True
    no_min_p: bool = True

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_lists(
        cls,
        *,
        temperature: list[float],
        device: torch.device | str = "cpu",
        top_k: list[int] | None = None,
        top_p: list[float] | None = None,
        min_p: list[float] | None = None,
        seeds: list[int] | None = None,
        steps: list[int] | None = None,
        repetition_penalty: list[float] | None = None,
        presence_penalty: list[float] | None = None,
        frequency_penalty: list[float] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        output_token_ids: list[list[int]] | None = None,
        vocab_size: int | None = None,
        max_num_logprobs: int = -1,
        banned_token_ids: list[list[int]] | None = None,
    ) -> SamplingMetadata:
        """Builds the tensors from per-row Python lists (defaults disable each control).

        The batch-wide flags are read from the lists, not from the tensors: on an accelerator
        each read of a device tensor would wait for the device, several times a step."""
        n = len(temperature)

        def col(values, default, dtype):
            return torch.tensor(values if values is not None else [default] * n, dtype=dtype).to(device)

        def every(values, holds) -> bool:
            return values is None or all(holds(v) for v in values)

        rep = col(repetition_penalty, 1.0, torch.float32)
        pres = col(presence_penalty, 0.0, torch.float32)
        freq = col(frequency_penalty, 0.0, torch.float32)
        no_penalties = (
            every(repetition_penalty, lambda v: v == 1.0)
            and every(presence_penalty, lambda v: v == 0.0)
            and every(frequency_penalty, lambda v: v == 0.0)
        )
        prompt_t = output_t = None
        if not no_penalties:
            if vocab_size is None:
                raise ValueError("vocab_size is required when penalties are used")
            prompt_t = pad_token_lists(prompt_token_ids or [[] for _ in range(n)], vocab_size, device)
            output_t = pad_token_lists(output_token_ids or [[] for _ in range(n)], vocab_size, device)
        temp = col(temperature, 1.0, torch.float32)
        tk = col(top_k, 0, torch.int32)
        tp = col(top_p, 1.0, torch.float32)
        mp = col(min_p, 0.0, torch.float32)
        pairs = [(i, t) for i, ids in enumerate(banned_token_ids or []) for t in ids]
        banned = torch.tensor(pairs, dtype=torch.int64).to(device) if pairs else None
        return cls(
            temperature=temp,
            top_k=tk,
            top_p=tp,
            min_p=mp,
            seeds=col(seeds, 0, torch.int64),
            steps=col(steps, 0, torch.int64),
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
            prompt_token_ids=prompt_t,
            output_token_ids=output_t,
            max_num_logprobs=max_num_logprobs,
            banned=banned,
            all_greedy=all(t == 0 for t in temperature),
            no_penalties=no_penalties,
            no_top_k=every(top_k, lambda v: v <= 0),
            no_top_p=every(top_p, lambda v: v >= 1.0),
            no_min_p=every(min_p, lambda v: v <= 0.0),
        )


def pad_token_lists(rows: list[list[int]], pad_id: int, device: torch.device | str) -> torch.Tensor:
    """Pads ragged token-id lists into one [B, max_len] int64 tensor (at least one column)."""
    width = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device)


@dataclass(slots=True)
class SampleOutput:
    """What `Backend.sample` returns for B rows."""

    sampled_token_ids: torch.Tensor  # [B] int64
    # Log-probabilities come from the raw logits (log_softmax before any processing), as
    # OpenAI's and vLLM's logprobs do; None unless max_num_logprobs >= 0.
    sampled_logprobs: torch.Tensor | None = None  # [B] float32
    top_logprobs: torch.Tensor | None = None  # [B, k] float32, descending
    top_token_ids: torch.Tensor | None = None  # [B, k] int64

"""Pure-Python translation of HAL metadata into the arguments of torch_npu's fused operators.

Everything here takes host values (ints, lists, CPU tensors) and returns plain values or small
dataclasses, so the conventions that are easy to get wrong (cumulative versus per-sequence
lengths, the sparse_mode / pre_tokens pair of a sliding window, which rows of a mixed batch are
decodes) are unit-tested on any machine; `op_mapping` feeds the results to the operators.

Conventions of `torch_npu.npu_fused_infer_attention_score` (FIA) with ``input_layout="TND"`` and
a paged KV cache, as vllm-ascend's attention backend calls it:

- ``actual_seq_lengths``: *cumulative* query ends, i.e. ``query_start_loc[1:]``;
- ``actual_seq_lengths_kv``: *per-sequence* KV lengths, i.e. ``seq_lens`` (with ``block_table``);
- ``block_table``: int32 [B, max_blocks]; ``block_size``: tokens per block; key/value are the
  caches viewed as [num_blocks, block_size, num_kv_heads * head_dim];
- causal masking aligned to the bottom-right corner (the query is the *last* tokens of the
  sequence) is ``sparse_mode=3`` with the compressed 2048x2048 upper-triangular mask;
- a sliding window is ``sparse_mode=4`` (band, also bottom-right aligned) with ``pre_tokens`` /
  ``next_tokens`` bounding ``key_pos - query_pos`` to ``[-pre_tokens, next_tokens]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# FIA's "no limit" value for pre_tokens / next_tokens (INT32_MAX), as in the operator signature.
FIA_NO_LIMIT = 2147483647
# Side of the compressed causal mask that sparse modes 2/3/4 take (the operator expands it).
FIA_COMPRESSED_MASK_SIZE = 2048
SPARSE_MODE_RIGHT_DOWN_CAUSAL = 3
SPARSE_MODE_BAND = 4


def _as_list(values: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


@dataclass(frozen=True, slots=True)
class FiaArgs:
    """Host-side arguments of one `npu_fused_infer_attention_score` call over a TND batch."""

    actual_seq_lengths: list[int]  # cumulative query ends, one per sequence
    actual_seq_lengths_kv: list[int]  # KV length per sequence (paged: not cumulative)
    num_heads: int
    num_key_value_heads: int
    scale: float
    block_size: int
    sparse_mode: int
    pre_tokens: int
    next_tokens: int
    input_layout: str = "TND"

    def as_kwargs(self) -> dict[str, object]:
        """Keyword arguments for the operator, minus the tensors (query/key/value/mask/table)."""
        return {
            "actual_seq_lengths": self.actual_seq_lengths,
            "actual_seq_lengths_kv": self.actual_seq_lengths_kv,
            "num_heads": self.num_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "scale": self.scale,
            "block_size": self.block_size,
            "sparse_mode": self.sparse_mode,
            "pre_tokens": self.pre_tokens,
            "next_tokens": self.next_tokens,
            "input_layout": self.input_layout,
        }


def mask_window(sliding_window: int | None) -> tuple[int, int, int]:
    """(sparse_mode, pre_tokens, next_tokens) for causal attention with an optional window.

    The HAL window admits keys in ``(p - W, p]``: W keys, the query's own included. Band mode keeps
    ``p - pre_tokens <= key <= p + next_tokens``, so ``pre_tokens = W - 1`` and ``next_tokens = 0``.
    Without a window, rightDownCausal ignores both bounds; they are passed as documented defaults.
    """
    if sliding_window is None:
        return SPARSE_MODE_RIGHT_DOWN_CAUSAL, FIA_NO_LIMIT, 0
    if sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    return SPARSE_MODE_BAND, sliding_window - 1, 0


def fia_args(
    query_start_loc: Sequence[int] | torch.Tensor,
    seq_lens: Sequence[int] | torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    block_size: int,
    sliding_window: int | None = None,
) -> FiaArgs:
    """FIA arguments for a whole mixed batch (prefill chunks and decodes in one TND call)."""
    qsl = _as_list(query_start_loc)
    lens = _as_list(seq_lens)
    if len(qsl) != len(lens) + 1 or (qsl and qsl[0] != 0):
        raise ValueError(
            f"query_start_loc {qsl} must start at 0 and have len(seq_lens) + 1 = {len(lens) + 1} entries"
        )
    for i, n in enumerate(lens):
        q = qsl[i + 1] - qsl[i]
        if q < 1 or q > n:
            raise ValueError(
                f"sequence {i} has query length {q} and context length {n}; need 1 <= query <= context"
            )
    sparse_mode, pre, nxt = mask_window(sliding_window)
    return FiaArgs(
        actual_seq_lengths=qsl[1:],
        actual_seq_lengths_kv=lens,
        num_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        scale=float(scale),
        block_size=block_size,
        sparse_mode=sparse_mode,
        pre_tokens=pre,
        next_tokens=nxt,
    )


@dataclass(frozen=True, slots=True)
class BatchPart:
    """A contiguous run of sequences of one kind, for chips where FIA takes one kind per call."""

    kind: str  # "decode" (query length 1) or "prefill" (a chunk, possibly after a cached prefix)
    seq_rows: list[int]  # rows of seq_lens / block_tables it covers
    token_start: int  # its query tokens are [token_start, token_end) of the flat batch
    token_end: int
    query_start_loc: list[int]  # rebased to start at 0, len(seq_rows) + 1 entries
    seq_lens: list[int]


def split_by_kind(
    query_start_loc: Sequence[int] | torch.Tensor, seq_lens: Sequence[int] | torch.Tensor
) -> list[BatchPart]:
    """Splits a batch into maximal contiguous runs of decodes and of prefill chunks.

    Runs keep batch order, so each part is a slice of the flat query tokens and of the
    block-table rows and the outputs concatenate back in place without a permutation.
    """
    qsl = _as_list(query_start_loc)
    lens = _as_list(seq_lens)
    parts: list[BatchPart] = []
    i = 0
    while i < len(lens):
        kind = "decode" if qsl[i + 1] - qsl[i] == 1 else "prefill"
        j = i
        while j + 1 < len(lens) and ("decode" if qsl[j + 2] - qsl[j + 1] == 1 else "prefill") == kind:
            j += 1
        start = qsl[i]
        parts.append(
            BatchPart(
                kind=kind,
                seq_rows=list(range(i, j + 1)),
                token_start=start,
                token_end=qsl[j + 1],
                query_start_loc=[q - start for q in qsl[i : j + 2]],
                seq_lens=lens[i : j + 1],
            )
        )
        i = j + 1
    return parts


@dataclass(frozen=True, slots=True)
class TokenLayout:
    """Where each flat query token sits: its sequence, its row inside the chunk, its position."""

    seq_index: list[int]
    row_in_seq: list[int]
    position: list[int]


def token_layout(
    query_start_loc: Sequence[int] | torch.Tensor, seq_lens: Sequence[int] | torch.Tensor
) -> TokenLayout:
    """Host version of what the tensor attention path computes on the device (kept for tests)."""
    qsl = _as_list(query_start_loc)
    lens = _as_list(seq_lens)
    seq, row, pos = [], [], []
    for i, n in enumerate(lens):
        q = qsl[i + 1] - qsl[i]
        for j in range(q):
            seq.append(i)
            row.append(j)
            pos.append(n - q + j)  # the query is the last q tokens of the context
    return TokenLayout(seq, row, pos)


def blocks_touched(seq_len: int, block_size: int, block_row: Sequence[int] | torch.Tensor) -> list[int]:
    """Physical blocks holding tokens ``0..seq_len-1`` of one sequence (what FIA will read)."""
    row = _as_list(block_row)
    return row[: -(-seq_len // block_size)]

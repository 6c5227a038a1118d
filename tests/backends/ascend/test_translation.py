"""HAL metadata -> FIA / cache-write / sampling arguments, against batches worked out by hand.

The batch used throughout (block_size 4):

    seq 0: decode,      seq_len 5,  query = token at position 4,      block row [7, 3, 0]
    seq 1: decode,      seq_len 9,  query = token at position 8,      block row [2, 5, 8]
    seq 2: prefill chunk after a cached prefix of 6 tokens, 4 new tokens at positions 6..9,
           seq_len 10, block row [1, 4, 6]: the chunk crosses the border of its blocks 1 and 2
           (positions 6, 7 sit in block 4, positions 8, 9 in block 6).

    query_start_loc = [0, 1, 2, 6]; seq_lens = [5, 9, 10]
"""

from __future__ import annotations

import pytest
import torch

from xllm.backends.ascend.translation import (
    FIA_NO_LIMIT,
    BatchPart,
    blocks_touched,
    fia_args,
    mask_window,
    split_by_kind,
    token_layout,
)

QSL = torch.tensor([0, 1, 2, 6], dtype=torch.int32)
SEQ_LENS = torch.tensor([5, 9, 10], dtype=torch.int32)
TABLES = torch.tensor([[7, 3, 0], [2, 5, 8], [1, 4, 6]], dtype=torch.int32)
BLOCK_SIZE = 4


def test_fia_args_for_the_mixed_batch():
    args = fia_args(QSL, SEQ_LENS, num_heads=8, num_kv_heads=2, scale=0.125, block_size=BLOCK_SIZE)
    assert args.actual_seq_lengths == [1, 2, 6]  # cumulative query ends
    assert args.actual_seq_lengths_kv == [5, 9, 10]  # per-sequence KV lengths (paged)
    assert args.input_layout == "TND"
    assert (args.sparse_mode, args.pre_tokens, args.next_tokens) == (3, FIA_NO_LIMIT, 0)
    assert args.as_kwargs() == {
        "actual_seq_lengths": [1, 2, 6],
        "actual_seq_lengths_kv": [5, 9, 10],
        "num_heads": 8,
        "num_key_value_heads": 2,
        "scale": 0.125,
        "block_size": 4,
        "sparse_mode": 3,
        "pre_tokens": FIA_NO_LIMIT,
        "next_tokens": 0,
        "input_layout": "TND",
    }


def test_sliding_window_is_band_mode_with_window_minus_one_pre_tokens():
    # A window of 3 admits keys p-2, p-1, p: band [p - pre_tokens, p + next_tokens] = [p-2, p].
    args = fia_args(QSL, SEQ_LENS, num_heads=8, num_kv_heads=2, scale=1.0, block_size=4, sliding_window=3)
    assert (args.sparse_mode, args.pre_tokens, args.next_tokens) == (4, 2, 0)
    assert mask_window(1) == (4, 0, 0)  # a window of one: only the query's own key
    assert mask_window(None) == (3, FIA_NO_LIMIT, 0)
    with pytest.raises(ValueError):
        mask_window(0)


def test_fia_args_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="query length 2 and context length 1"):
        fia_args([0, 2], [1], num_heads=1, num_kv_heads=1, scale=1.0, block_size=4)
    with pytest.raises(ValueError, match="start at 0"):
        fia_args([1, 2], [3], num_heads=1, num_kv_heads=1, scale=1.0, block_size=4)
    with pytest.raises(ValueError, match="len\\(seq_lens\\) \\+ 1"):
        fia_args([0, 1], [3, 4], num_heads=1, num_kv_heads=1, scale=1.0, block_size=4)


def test_token_layout_positions():
    layout = token_layout(QSL, SEQ_LENS)
    assert layout.seq_index == [0, 1, 2, 2, 2, 2]
    assert layout.row_in_seq == [0, 0, 0, 1, 2, 3]
    assert layout.position == [4, 8, 6, 7, 8, 9]


def test_blocks_read_per_sequence():
    assert blocks_touched(5, BLOCK_SIZE, TABLES[0]) == [7, 3]
    assert blocks_touched(9, BLOCK_SIZE, TABLES[1]) == [2, 5, 8]
    assert blocks_touched(10, BLOCK_SIZE, TABLES[2]) == [1, 4, 6]


def test_split_by_kind_keeps_batch_order():
    parts = split_by_kind(QSL, SEQ_LENS)
    assert parts == [
        BatchPart("decode", [0, 1], 0, 2, [0, 1, 2], [5, 9]),
        BatchPart("prefill", [2], 2, 6, [0, 4], [10]),
    ]
    # prefill, decode, decode, prefill: three runs, offsets rebased to each run's first token.
    parts = split_by_kind([0, 3, 4, 5, 7], [3, 6, 2, 9])
    assert [
        (p.kind, p.seq_rows, p.token_start, p.token_end, p.query_start_loc, p.seq_lens) for p in parts
    ] == [
        ("prefill", [0], 0, 3, [0, 3], [3]),
        ("decode", [1, 2], 3, 5, [0, 1, 2], [6, 2]),
        ("prefill", [3], 5, 7, [0, 2], [9]),
    ]

"""Shared cases of the Ascend backend tests: the hand-worked mixed batch, a naive attention
written straight from `AttentionMetadata`'s docstring, rotary tables and a sampling batch."""

from __future__ import annotations

import torch

from xllm.backends.ascend.translation import token_layout
from xllm.hal import AttentionMetadata, SamplingMetadata


def naive_attention(q, k_cache, v_cache, qsl, seq_lens, tables, scale, window=None):
    """Token by token, straight from the AttentionMetadata docstring."""
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    layout = token_layout(qsl, seq_lens)
    out = torch.empty(q.shape, dtype=torch.float32)
    for t, (s, p) in enumerate(zip(layout.seq_index, layout.position, strict=True)):
        keys = [j for j in range(p + 1) if window is None or j > p - window]
        kk = torch.stack([k_cache[tables[s][j // block_size], j % block_size] for j in keys]).float()
        vv = torch.stack([v_cache[tables[s][j // block_size], j % block_size] for j in keys]).float()
        for h in range(q.shape[1]):
            w = torch.softmax((kk[:, h // group] @ q[t, h].float()) * scale, dim=0)
            out[t, h] = w @ vv[:, h // group]
    return out


def mixed_batch(dtype=torch.float32, window=None):
    """The hand-worked batch of test_translation: 2 decodes + 1 prefill chunk over a block border,
    plus a graph padding row (seq_len 1 over block 0, slot -1) and a table padded with -1."""
    torch.manual_seed(0)
    qsl = [0, 1, 2, 6, 7]
    seq_lens = [5, 9, 10, 1]
    tables = [[7, 3, -1], [2, 5, 8], [1, 4, 6], [0, -1, -1]]
    num_blocks, block_size, hkv, hq, d = 9, 4, 2, 4, 8
    k_cache = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d).to(dtype)
    q = torch.randn(7, hq, d).to(dtype)
    md = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor([12, 32, 18, 19, 24, 25, -1]),
        max_query_len=4,
        max_seq_len=10,
        scale=d**-0.5,
        sliding_window=window,
    )
    return q, k_cache, v_cache, md, qsl, seq_lens, tables


def make_cos_sin(max_pos: int, rot_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def sampling_case():
    torch.manual_seed(3)
    logits = torch.randn(5, 40) * 3
    sm = SamplingMetadata.from_lists(
        temperature=[0.0, 0.8, 1.0, 1.3, 0.5],
        top_k=[0, 5, 0, 3, 0],
        top_p=[1.0, 0.9, 0.7, 1.0, 1.0],
        min_p=[0.0, 0.0, 0.05, 0.0, 0.2],
        seeds=[11, 12, 13, 14, 15],
        steps=[0, 1, 2, 3, 4],
        repetition_penalty=[1.2, 1.0, 1.1, 1.0, 1.0],
        presence_penalty=[0.0, 0.5, 0.0, 0.0, 0.0],
        frequency_penalty=[0.0, 0.0, 0.3, 0.0, 0.0],
        prompt_token_ids=[[1, 2, 3], [4], [5, 6], [], [7]],
        output_token_ids=[[8, 8], [9], [10, 10, 10], [], []],
        vocab_size=40,
        max_num_logprobs=3,
    )
    return logits, sm

"""A stand-in for torch_npu that computes what the torch_npu API reference *documents* each
operator computes, in plain torch on the CPU, and records every call.

It is not a claim about hardware behaviour: it lets the tests check that the backend passes the
arguments the documentation asks for (cumulative versus per-sequence lengths, BBH cache views,
sparse modes, int32 slots) and that, under the documented semantics, the results equal the CPU
reference. Anything the documentation leaves open (e.g. negative slots) raises here, so the
backend must not depend on it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F


class DocumentedNpu(SimpleNamespace):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _record(self, name: str, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    # npu_rms_norm(x, gamma, epsilon=1e-6) -> (y, rstd)
    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self._record("npu_rms_norm", x=x, gamma=gamma, epsilon=epsilon)
        assert x.dtype == gamma.dtype
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + epsilon)
        return (gamma * (h * rstd).to(x.dtype)).to(x.dtype), rstd

    # npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6) -> (y, rstd, x1 + x2)
    def npu_add_rms_norm(self, x1, x2, gamma, epsilon=1e-6):
        self._record("npu_add_rms_norm", x1=x1, x2=x2, gamma=gamma, epsilon=epsilon)
        x = x1 + x2
        y, rstd = self.npu_rms_norm(x, gamma, epsilon)
        self.calls.pop()
        return y, rstd, x

    # npu_rotary_mul(input, r1, r2, rotary_mode='half'): 4-D input, r1/r2 broadcastable.
    # The reference's formula, written out here rather than taken from the backend's torch_ops, so
    # that a wrong convention shared by the backend and its helpers shows up as a wrong result:
    #   half:       x1, x2 = chunk(x, 2, -1);      x_new = cat((-x2, x1), -1)
    #   interleave: x1, x2 = x[..., ::2], x[..., 1::2]
    #               x_new = rearrange(stack((-x2, x1), -1), "... d two -> ... (d two)")
    #   output = r1 * x + r2 * x_new
    def npu_rotary_mul(self, x, r1, r2, rotary_mode="half"):
        self._record("npu_rotary_mul", x=x, r1=r1, r2=r2, rotary_mode=rotary_mode)
        assert x.dim() == 4 and r1.dim() == 4 and r2.dim() == 4
        assert rotary_mode in ("half", "interleave")
        if rotary_mode == "half":
            x1, x2 = torch.chunk(x, 2, -1)
            x_new = torch.cat((-x2, x1), dim=-1)
        else:
            x1, x2 = x[..., ::2], x[..., 1::2]
            x_new = torch.stack((-x2, x1), dim=-1).reshape(x.shape)  # "... d two -> ... (d two)"
        return r1 * x + r2 * x_new

    # npu_swiglu(x, dim=-1) = silu(first half) * second half
    def npu_swiglu(self, x, dim=-1):
        self._record("npu_swiglu", x=x, dim=dim)
        a, b = x.float().chunk(2, dim=dim)
        return (F.silu(a) * b).to(x.dtype)

    # _npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices): int32 slots
    def _npu_reshape_and_cache(self, key, value, key_cache, value_cache, slot_indices):
        self._record("_npu_reshape_and_cache", key=key, slot_indices=slot_indices)
        assert slot_indices.dtype == torch.int32
        assert key_cache.dtype in (torch.float16, torch.bfloat16)
        assert bool((slot_indices >= 0).all()), "negative slots: behaviour not documented"
        idx = slot_indices.long()
        key_cache.view(-1, *key_cache.shape[2:])[idx] = key
        value_cache.view(-1, *value_cache.shape[2:])[idx] = value

    # npu_fused_infer_attention_score, TND layout, paged KV ([blocks, block_size, H*D])
    def npu_fused_infer_attention_score(
        self,
        query,
        key,
        value,
        *,
        atten_mask=None,
        block_table=None,
        actual_seq_lengths=None,
        actual_seq_lengths_kv=None,
        num_heads=1,
        num_key_value_heads=0,
        scale=1.0,
        block_size=0,
        sparse_mode=0,
        pre_tokens=2147483647,
        next_tokens=2147483647,
        input_layout="BSH",
    ):
        self._record(
            "npu_fused_infer_attention_score",
            query=query,
            key=key,
            block_table=block_table,
            actual_seq_lengths=list(actual_seq_lengths),
            actual_seq_lengths_kv=list(actual_seq_lengths_kv),
            num_heads=num_heads,
            num_key_value_heads=num_key_value_heads,
            scale=scale,
            block_size=block_size,
            sparse_mode=sparse_mode,
            pre_tokens=pre_tokens,
            next_tokens=next_tokens,
            input_layout=input_layout,
            atten_mask=atten_mask,
        )
        assert input_layout == "TND" and query.dim() == 3 and query.dtype in (torch.float16, torch.bfloat16)
        assert key.dim() == 3 and key.shape[1] == block_size and block_table.dtype == torch.int32
        assert sparse_mode in (3, 4) and atten_mask is not None and atten_mask.shape == (2048, 2048)
        kv_heads = num_key_value_heads or num_heads
        head_dim = query.shape[2]
        out = torch.empty(query.shape, dtype=torch.float32)
        start = 0
        for b, (end, kv_len) in enumerate(zip(actual_seq_lengths, actual_seq_lengths_kv, strict=True)):
            q_len = end - start
            blocks = block_table[b, : -(-kv_len // block_size)].long()
            k = key[blocks].reshape(-1, kv_heads, head_dim)[:kv_len].float()
            v = value[blocks].reshape(-1, kv_heads, head_dim)[:kv_len].float()
            for i in range(q_len):
                qpos = kv_len - q_len + i  # bottom-right alignment
                if sparse_mode == 3:
                    lo, hi = 0, qpos
                else:  # band: qpos - pre_tokens <= key <= qpos + next_tokens
                    lo, hi = max(0, qpos - pre_tokens), min(kv_len - 1, qpos + next_tokens)
                for h in range(num_heads):
                    kh = h // (num_heads // kv_heads)
                    s = (k[lo : hi + 1, kh] @ query[start + i, h].float()) * scale
                    out[start + i, h] = torch.softmax(s, 0) @ v[lo : hi + 1, kh]
            start = end
        return out.to(query.dtype), torch.empty(0)

"""The torch paths the Ascend backend runs on the NPU, checked here on the CPU.

They are device-agnostic torch code, so their numerics are checked against hand-written
references and against the CPU reference backend (the oracle the conformance suite uses).
"""

from __future__ import annotations

import pytest
import torch

from tests.backends.ascend.cases import make_cos_sin, mixed_batch, naive_attention
from xllm.backends.ascend import torch_ops
from xllm.hal import get_backend


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_matches_naive(window):
    q, kc, vc, md, qsl, lens, tables = mixed_batch(window=window)
    out = torch_ops.paged_attention(q, kc, vc, md)
    ref = naive_attention(q, kc, vc, qsl, lens, tables, md.scale, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_cpu_backend(dtype):
    q, kc, vc, md, *_ = mixed_batch(dtype)
    cpu = get_backend("cpu")
    k = torch.zeros(q.shape[0], kc.shape[2], kc.shape[3], dtype=dtype)
    ref = cpu.attention(q, k, k.clone(), kc, vc, md)
    out = torch_ops.paged_attention(q, kc, vc, md)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.float(), ref.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2
    )


@pytest.mark.parametrize("neox", [True, False])
def test_rotary_cos_sin_feeds_rotary_mul_like_the_reference(neox):
    """cos/sin widened for npu_rotary_mul's 'half'/'interleave' modes give the HAL's rotation."""
    torch.manual_seed(2)
    positions = torch.tensor([0, 3, 17, 5])
    cache = make_cos_sin(32, 8)
    q = torch.randn(4, 3, 12)
    cos, sin = torch_ops.rotary_cos_sin(cache, positions, neox)
    assert cos.shape == (4, 1, 8)
    got = torch_ops.rotary_mul(q[..., :8], cos, sin, neox)
    half_cos, half_sin = cache[positions].unsqueeze(1).chunk(2, dim=-1)
    if neox:
        x1, x2 = q[..., :8].chunk(2, dim=-1)
        ref = torch.cat((x1 * half_cos - x2 * half_sin, x2 * half_cos + x1 * half_sin), dim=-1)
    else:
        x1, x2 = q[..., 0:8:2], q[..., 1:8:2]
        ref = torch.stack((x1 * half_cos - x2 * half_sin, x2 * half_cos + x1 * half_sin), dim=-1).flatten(-2)
    torch.testing.assert_close(got, ref)


def test_paged_attention_chunked_online_softmax_matches_one_chunk(monkeypatch):
    """Forcing one block per chunk (many online-softmax steps) changes nothing but rounding."""
    q, kc, vc, md, qsl, lens, tables = mixed_batch(window=5)
    whole = torch_ops.paged_attention(q, kc, vc, md)
    monkeypatch.setattr(torch_ops, "_ATTENTION_CHUNK_BYTES", 1)
    chunked = torch_ops.paged_attention(q, kc, vc, md)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        chunked, naive_attention(q, kc, vc, qsl, lens, tables, md.scale, 5), atol=1e-5, rtol=1e-5
    )

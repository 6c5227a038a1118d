"""Triton kernels of the CUDA backend, interpreted on CPU tensors, against plain torch maths and
the CPU reference backend: RMSNorm (+ residual), RoPE (NeoX / GPT-J, partial), gated activations,
and the KV-cache write."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Hugging Face's LlamaRMSNorm, verbatim in spirit.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 100)])  # 100: a row that is not a power of two
def test_rms_norm_matches_hf(backend, dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    r = torch.randn(shape, generator=gen).to(dtype)
    x0, r0 = x.clone(), r.clone()
    # One ulp of the output dtype at most (the row reduction may sum in another order).
    torch.testing.assert_close(backend.rms_norm(x, w, 1e-6), _hf_rms_norm(x, w, 1e-6))
    out, h = backend.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(h, x + r)  # the residual add happens in x's dtype, as HF does it
    torch.testing.assert_close(out, _hf_rms_norm(x + r, w, 1e-6))
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched


def _rope_reference(positions, x, cache, neox):
    rot = cache.shape[1]
    cos, sin = cache[positions].chunk(2, dim=-1)  # [T, rot/2]
    xf = x.to(torch.float32).clone()
    part = xf[..., :rot]
    if neox:
        x1, x2 = part[..., : rot // 2], part[..., rot // 2 :]
    else:
        x1, x2 = part[..., 0::2], part[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    if neox:
        xf[..., :rot] = torch.cat((o1, o2), dim=-1)
    else:
        xf[..., :rot] = torch.stack((o1, o2), dim=-1).flatten(-2)
    return xf.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("head_dim,rot_dim", [(64, 64), (80, 32)])
def test_rotary_in_place(backend, dtype, neox, head_dim, rot_dim):
    gen = torch.Generator().manual_seed(1)
    t, hq, hkv = 5, 6, 2
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    ang = torch.arange(64, dtype=torch.float64)[:, None] * inv
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1).float()
    positions = torch.randint(0, 64, (t,), generator=gen)
    q = torch.randn(t, hq, head_dim, generator=gen).to(dtype)
    k = torch.randn(t, hkv, head_dim, generator=gen).to(dtype)
    want_q, want_k = _rope_reference(positions, q, cache, neox), _rope_reference(positions, k, cache, neox)
    out_q, out_k = backend.rotary_embedding(positions, q, k, cache, neox)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    tol = {"rtol": 0, "atol": 0} if dtype != torch.float32 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(q, want_q, **tol)
    torch.testing.assert_close(k, want_k, **tol)


def test_rotary_on_strided_views_of_qkv(backend, cpu):
    """q and k are usually views into one fused qkv projection: rotation must go through strides."""
    gen = torch.Generator().manual_seed(2)
    t, hq, hkv, d = 4, 4, 2, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen)
    cache = torch.randn(16, d, generator=gen)
    positions = torch.tensor([0, 3, 7, 15])
    mine = qkv.clone()
    q, k = mine[:, : hq * d].view(t, hq, d), mine[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    backend.rotary_embedding(positions, q, k, cache, True)
    ref = qkv.clone()
    rq, rk = ref[:, : hq * d].view(t, hq, d), ref[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    cpu.rotary_embedding(positions, rq, rk, cache, True)
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)  # v columns untouched too


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_activations_match_torch(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(2, 3, 2 * 1100, generator=gen)).to(dtype)  # d=1100 spans two column blocks
    gate, up = x.chunk(2, dim=-1)
    # torch's dtype-aware default tolerances: a rounding of the activation or the product may
    # land one ulp apart (torch's vectorised exp is not the kernel's), nothing more.
    torch.testing.assert_close(backend.silu_and_mul(x), F.silu(gate) * up)
    torch.testing.assert_close(backend.gelu_and_mul(x, "none"), F.gelu(gate) * up)
    torch.testing.assert_close(backend.gelu_and_mul(x, "tanh"), F.gelu(gate, approximate="tanh") * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_writes_slots_and_skips_minus_one(backend, dtype):
    gen = torch.Generator().manual_seed(4)
    nb, bs, hkv, d = 5, 16, 3, 24  # odd head count and head_dim: masks in both directions
    t = 9
    k = torch.randn(t, hkv, d, generator=gen).to(dtype)
    v = torch.randn(t, hkv, d, generator=gen).to(dtype)
    slots = torch.tensor([0, 17, -1, 79, 33, -1, 15, 16, 48])
    kc = torch.full((nb, bs, hkv, d), 7.0, dtype=dtype)
    vc = torch.full((nb, bs, hkv, d), -7.0, dtype=dtype)
    backend.reshape_and_cache(k, v, kc, vc, slots)
    want_k = torch.full_like(kc, 7.0).view(nb * bs, hkv, d)
    want_v = torch.full_like(vc, -7.0).view(nb * bs, hkv, d)
    keep = slots >= 0
    want_k[slots[keep]] = k[keep]
    want_v[slots[keep]] = v[keep]
    assert torch.equal(kc.view(nb * bs, hkv, d), want_k)
    assert torch.equal(vc.view(nb * bs, hkv, d), want_v)


def test_empty_batches(backend):
    x = torch.empty(0, 64)
    assert backend.rms_norm(x, torch.ones(64), 1e-6).shape == (0, 64)
    assert backend.silu_and_mul(torch.empty(0, 8)).shape == (0, 4)
    kc = torch.zeros(2, 16, 1, 8)
    backend.reshape_and_cache(
        torch.empty(0, 1, 8), torch.empty(0, 1, 8), kc, kc.clone(), torch.empty(0, dtype=torch.int64)
    )
    assert not kc.any()

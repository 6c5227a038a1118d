"""CPU elementwise ops against the textbook formulas (HF Llama RMSNorm, rotate_half rotary)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm.forward, verbatim.
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_hf(cpu, dtype):
    torch.manual_seed(0)
    x = torch.randn(7, 64, dtype=dtype)
    w = torch.randn(64, dtype=dtype)
    x_before = x.clone()
    out = cpu.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype
    assert torch.equal(out, hf_rms_norm(x, w, 1e-6))
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_residual_returns_norm_and_sum(cpu, dtype):
    torch.manual_seed(1)
    x, r = torch.randn(2, 5, 32, dtype=dtype), torch.randn(2, 5, 32, dtype=dtype)
    w = torch.rand(32, dtype=dtype)
    xs, rs = x.clone(), r.clone()
    out, h = cpu.rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(h, xs + rs)
    assert torch.equal(out, hf_rms_norm(xs + rs, w, 1e-5))
    assert torch.equal(x, xs) and torch.equal(r, rs)


def make_cos_sin(max_pos: int, rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_neox(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    # HF apply_rotary_pov_emb with emb = cat(freqs, freqs), on the first rot_dim dims.
    rot = cache.shape[1]
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    xr = x[..., :rot].float()
    return torch.cat([xr * cos + rotate_half(xr) * sin, x[..., rot:].float()], dim=-1)


def loop_gptj(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    rot = cache.shape[1]
    out = x.clone().float()
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(rot // 2):
                c, s = cache[positions[t], i], cache[positions[t], rot // 2 + i]
                a, b = float(x[t, h, 2 * i]), float(x[t, h, 2 * i + 1])
                out[t, h, 2 * i] = a * c - b * s
                out[t, h, 2 * i + 1] = b * c + a * s
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rot_dim", [16, 8])  # full and partial rotary
def test_rotary_neox_matches_rotate_half(cpu, dtype, rot_dim):
    torch.manual_seed(2)
    cache = make_cos_sin(64, rot_dim)
    positions = torch.tensor([0, 3, 17, 63, 5])
    q, k = torch.randn(5, 4, 16, dtype=dtype), torch.randn(5, 2, 16, dtype=dtype)
    want_q, want_k = hf_neox(q, positions, cache), hf_neox(k, positions, cache)
    got_q, got_k = cpu.rotary_embedding(positions, q.clone(), k.clone(), cache, neox_style=True)
    assert got_q.dtype == dtype
    torch.testing.assert_close(got_q.float(), want_q, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    torch.testing.assert_close(got_k.float(), want_k, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("rot_dim", [8, 4])
def test_rotary_gptj_matches_loop(cpu, rot_dim):
    torch.manual_seed(3)
    cache = make_cos_sin(32, rot_dim)
    positions = torch.tensor([1, 30, 7], dtype=torch.int32)
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    got_q, got_k = cpu.rotary_embedding(positions, q.clone(), k.clone(), cache, neox_style=False)
    torch.testing.assert_close(got_q, loop_gptj(q, positions, cache), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, loop_gptj(k, positions, cache), atol=1e-5, rtol=1e-5)


def test_rotary_position_zero_is_identity(cpu):
    q, k = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    got_q, got_k = cpu.rotary_embedding(
        torch.zeros(2, dtype=torch.int64), q.clone(), k.clone(), make_cos_sin(4, 8)
    )
    torch.testing.assert_close(got_q, q)
    torch.testing.assert_close(got_k, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gated_activations(cpu, dtype):
    torch.manual_seed(4)
    x = torch.randn(3, 5, 20, dtype=dtype)
    g, u = x.float()[..., :10], x.float()[..., 10:]
    silu = g / (1 + torch.exp(-g)) * u
    gelu = 0.5 * g * (1 + torch.erf(g / math.sqrt(2))) * u
    gelu_tanh = F.gelu(g, approximate="tanh") * u
    tol = dict(atol=TOL[dtype] * 4, rtol=TOL[dtype])
    torch.testing.assert_close(cpu.silu_and_mul(x).float(), silu, **tol)
    torch.testing.assert_close(cpu.gelu_and_mul(x).float(), gelu, **tol)
    torch.testing.assert_close(cpu.gelu_and_mul(x, approximate="tanh").float(), gelu_tanh, **tol)
    assert cpu.silu_and_mul(x).shape == (3, 5, 10) and cpu.silu_and_mul(x).dtype == dtype


def test_reshape_and_cache_writes_slots_and_skips_negative(cpu):
    num_blocks, block_size, heads, dim = 4, 4, 2, 8
    kc = torch.zeros(num_blocks, block_size, heads, dim)
    vc = torch.zeros_like(kc)
    k, v = torch.randn(3, heads, dim), torch.randn(3, heads, dim)
    cpu.reshape_and_cache(k, v, kc, vc, torch.tensor([5, -1, 15]))
    assert torch.equal(kc[1, 1], k[0]) and torch.equal(vc[1, 1], v[0])
    assert torch.equal(kc[3, 3], k[2]) and torch.equal(vc[3, 3], v[2])
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    written[1, 1] = written[3, 3] = True
    assert not kc[~written].any() and not vc[~written].any()


def test_bad_inputs_raise_value_error_naming_argument(cpu):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="'weight'"):
        cpu.rms_norm(x, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match="'x'"):
        cpu.rms_norm(x.to(torch.int32), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="'residual'"):
        cpu.rms_norm(x, torch.randn(8), 1e-6, residual=torch.randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="'k'"):
        cpu.rotary_embedding(
            torch.zeros(2, dtype=torch.int64), torch.randn(2, 2, 8), torch.randn(3, 2, 8), make_cos_sin(4, 8)
        )
    with pytest.raises(ValueError, match="'x'"):
        cpu.silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="'slot_mapping'"):
        kc = torch.zeros(2, 4, 2, 8)
        cpu.reshape_and_cache(
            torch.randn(3, 2, 8), torch.randn(3, 2, 8), kc, kc.clone(), torch.zeros(2, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="'v'"):
        kc = torch.zeros(2, 4, 2, 8)
        cpu.reshape_and_cache(
            torch.randn(3, 2, 8),
            torch.randn(3, 2, 8).half(),
            kc,
            kc.clone(),
            torch.zeros(3, dtype=torch.int64),
        )


def test_linear_split_across_cores_equals_one_gemm(cpu):
    """The decode-sized batched GEMM over weight slices must give F.linear's result."""
    backend = cpu
    gen = torch.Generator().manual_seed(0)
    for out_features in (4096, 4099):  # an odd width falls back to one GEMM
        weight = torch.randn(out_features, 96, generator=gen)
        bias = torch.randn(out_features, generator=gen)
        for rows in (1, 3, 64, 300):
            x = torch.randn(rows, 96, generator=gen)
            want = torch.nn.functional.linear(x, weight, bias)
            assert torch.allclose(backend.linear(x, weight, bias), want, atol=1e-5, rtol=1e-5)
            assert torch.allclose(backend.linear(x, weight), want - bias, atol=1e-5, rtol=1e-5)


def test_linear_rejects_mismatched_shapes(cpu):
    backend = cpu
    with pytest.raises(ValueError, match="'weight'"):
        backend.linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="'bias'"):
        backend.linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))

"""The CPU backend's fused C kernels against its plain torch ops (the reference).

Elementwise kernels are built to round as the torch ops do, so rotary, SiLU * up and the cache
write must agree exactly; RMSNorm, the GEMV/GEMM and attention sum in another order and agree
to float32 rounding. Each case also covers the layouts the model hands over (q and k as strided
views of one qkv matrix, graph padding rows, GQA, a sliding window, ragged lengths), and every
SIMD variant of the source is built and checked (AVX-512, AVX2/FMA, plain C).
"""

from __future__ import annotations

import pytest
import torch

from xllm.backends.cpu import cbuild, kernels
from xllm.backends.cpu.backend import CpuBackend
from xllm.hal.metadata import AttentionMetadata


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_rms_norm_with_and_without_residual(cpu, cpu_kernels, rows: int) -> None:
    g = _gen(rows)
    x, r = torch.randn(rows, 96, generator=g), torch.randn(rows, 96, generator=g)
    w = torch.randn(96, generator=g)
    torch.testing.assert_close(
        cpu_kernels.rms_norm(x, w, 1e-6), cpu.rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6
    )
    got_out, got_sum = cpu_kernels.rms_norm(x, w, 1e-5, r)
    want_out, want_sum = cpu.rms_norm(x, w, 1e-5, r)
    assert torch.equal(got_sum, want_sum)  # the residual add is one rounding either way
    torch.testing.assert_close(got_out, want_out, rtol=1e-6, atol=1e-6)
    # Per-head norms (Qwen3's q/k norm) hand over [T, heads, head_dim].
    heads = x.view(rows, 3, 32)
    torch.testing.assert_close(cpu_kernels.rms_norm(heads, w[:32], 1e-6), cpu.rms_norm(heads, w[:32], 1e-6))


@pytest.mark.parametrize("neox_style", [True, False])
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_rotary_on_strided_views_of_qkv_is_exact(cpu, cpu_kernels, neox_style: bool, rot_dim: int) -> None:
    g = _gen(rot_dim)
    qkv = torch.randn(5, (6 + 2 * 2) * 64, generator=g)
    cache = torch.randn(100, rot_dim, generator=g)
    positions = torch.tensor([0, 7, 99, 3, 42])

    def run(backend):
        t = qkv.clone()
        q, k = t[:, : 6 * 64].view(5, 6, 64), t[:, 6 * 64 : 8 * 64].view(5, 2, 64)
        backend.rotary_embedding(positions, q, k, cache, neox_style)
        return t

    assert torch.equal(run(cpu_kernels), run(cpu))  # v, past q and k, untouched on both sides


def test_silu_and_mul_and_linear(cpu, cpu_kernels) -> None:
    g = _gen(5)
    x = torch.randn(7, 2 * 80, generator=g) * 4
    torch.testing.assert_close(cpu_kernels.silu_and_mul(x), cpu.silu_and_mul(x), rtol=1e-6, atol=1e-6)
    # Weight rows not a multiple of the 4-row tile, inputs not a multiple of the vector width.
    w, b = torch.randn(83, 100, generator=g), torch.randn(83, generator=g)
    for rows in (1, 2, 3, 4, 5, 6, 8, 33):  # each small-batch tile, then the wide ones
        a = torch.randn(rows, 100, generator=g)
        torch.testing.assert_close(cpu_kernels.linear(a, w, b), cpu.linear(a, w, b), rtol=1e-5, atol=1e-5)
    # Rows of x as a strided view (a slice of a wider matrix).
    wide = torch.randn(6, 130, generator=g)
    torch.testing.assert_close(
        cpu_kernels.linear(wide[:, :100], w, None), wide[:, :100] @ w.T, rtol=1e-5, atol=1e-5
    )


def test_linear_past_one_l2_chunk_of_rows() -> None:
    # 256 KiB of float32 rows of 1000 inputs is 64 rows: 150 rows take three chunks.
    g = _gen(6)
    x, w = torch.randn(150, 1000, generator=g), torch.randn(40, 1000, generator=g)
    torch.testing.assert_close(kernels.linear(x, w, None), x @ w.T, rtol=1e-4, atol=1e-4)


def test_cache_write_skips_padding_slots(cpu, cpu_kernels) -> None:
    g = _gen(7)
    kv = torch.randn(4, 3 * 2 * 16, generator=g)
    k, v = kv[:, : 2 * 16].view(4, 2, 16), kv[:, 2 * 16 : 4 * 16].view(4, 2, 16)
    slots = torch.tensor([5, -1, 0, 17])
    caches = []
    for backend in (cpu, cpu_kernels):
        kc, vc = torch.zeros(3, 8, 2, 16), torch.zeros(3, 8, 2, 16)
        backend.reshape_and_cache(k, v, kc, vc, slots)
        caches.append((kc, vc))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert caches[1][0].flatten(0, 1)[5].equal(k[0]) and not caches[1][0].flatten(0, 1)[1].any()


def _decode_metadata(seq_lens: list[int], tables: torch.Tensor, window: int | None) -> AttentionMetadata:
    b = len(seq_lens)
    return AttentionMetadata(
        query_start_loc=torch.arange(b + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.full((b,), -1, dtype=torch.int64),
        max_query_len=1,
        max_seq_len=max(seq_lens),
        scale=0.125,
        sliding_window=window,
        query_start_loc_host=list(range(b + 1)),
        seq_lens_host=seq_lens,
    )


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("rows", [5, 17], ids=["a-task-per-kv-head", "a-task-per-sequence"])
def test_paged_decode_attention(
    cpu, cpu_kernels, window: int | None, heads: tuple[int, int], rows: int
) -> None:
    hq, hkv = heads
    g = _gen(hq * 10 + hkv + rows)
    k_cache, v_cache = torch.randn(12, 4, hkv, 64, generator=g), torch.randn(12, 4, hkv, 64, generator=g)
    # The last row is a graph pad row: one token over block 0. From 4 rows per thread on, the
    # kernel takes a whole sequence per task instead of one KV head of it.
    seq_lens = ([1, 9, 20, 4] * 5)[: rows - 1] + [1]
    tables = torch.randint(1, 12, (rows, 6), generator=g, dtype=torch.int32)
    tables[rows - 1] = 0
    q = torch.randn(rows, hq, 64, generator=g)
    md = _decode_metadata(seq_lens, tables, window)
    k_new = v_new = torch.zeros(rows, hkv, 64)
    got = cpu_kernels.attention(q, k_new, v_new, k_cache, v_cache, md)
    want = cpu.attention(q, k_new, v_new, k_cache, v_cache, md)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_rows_of_a_mixed_batch_use_the_kernel_and_agree(cpu, cpu_kernels) -> None:
    g = _gen(11)
    k_cache, v_cache = torch.randn(10, 4, 2, 32, generator=g), torch.randn(10, 4, 2, 32, generator=g)
    # Sequence 0 decodes (1 token of 7), sequence 1 prefills a chunk of 5 (of 9).
    qsl, seq_lens = [0, 1, 6], [7, 9]
    md = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([[3, 4, 0], [5, 6, 7]], dtype=torch.int32),
        slot_mapping=torch.full((6,), -1, dtype=torch.int64),
        max_query_len=5,
        max_seq_len=9,
        scale=0.2,
        query_start_loc_host=qsl,
        seq_lens_host=seq_lens,
    )
    q = torch.randn(6, 4, 32, generator=g)
    kv = torch.zeros(6, 2, 32)
    got = cpu_kernels.attention(q, kv, kv, k_cache, v_cache, md)
    torch.testing.assert_close(got, cpu.attention(q, kv, kv, k_cache, v_cache, md), rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_the_plain_ops(cpu, cpu_kernels) -> None:
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    assert kernels.rms_norm(x, w, 1e-6, None) is None
    assert torch.equal(cpu_kernels.rms_norm(x, w, 1e-6), cpu.rms_norm(x, w, 1e-6))


def test_the_environment_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLLM_CPU_KERNELS", "0")
    assert CpuBackend().kernels is None
    assert CpuBackend(kernels=False).kernels is None


@pytest.mark.parametrize(
    "isa_flags",
    [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma")],
    ids=["avx2", "plain-c"],
)
def test_every_simd_variant_matches_the_plain_ops(cpu, isa_flags, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GEMM, attention, softmax and SiLU have AVX-512 bodies and AVX2/FMA or plain C ones;
    the host builds one, so the others are built here with the wider ISAs switched off (a no-op
    on hosts without them)."""
    monkeypatch.setattr(cbuild, "BASE_FLAGS", cbuild.BASE_FLAGS + isa_flags)
    kernels._library.cache_clear()
    try:
        if not kernels.available():
            pytest.skip("no C compiler here")
        g = _gen(13)
        w = torch.randn(83, 100, generator=g)
        for rows in (1, 3, 9):
            x = torch.randn(rows, 100, generator=g)
            torch.testing.assert_close(
                kernels.linear(x, w, None), cpu.linear(x, w, None), rtol=1e-5, atol=1e-5
            )
        q, kc, vc = (
            torch.randn(2, 4, 32, generator=g),
            torch.randn(4, 4, 2, 32, generator=g),
            torch.randn(4, 4, 2, 32, generator=g),
        )
        md = _decode_metadata([5, 11], torch.tensor([[1, 2, 0], [3, 1, 2]], dtype=torch.int32), None)
        got = kernels.paged_decode(q, kc, vc, md.block_tables, md.seq_lens, md.scale, None)
        kv = torch.zeros(2, 2, 32)
        torch.testing.assert_close(got, cpu.attention(q, kv, kv, kc, vc, md), rtol=1e-5, atol=1e-5)
        # 40 keys: whole groups of 16 and 4 and a tail, for the vector softmax and scoring.
        long_q, tables = torch.randn(1, 4, 32, generator=g), torch.tensor([[1, 2, 3, 0, 1, 2, 3, 0, 1, 2]])
        md = _decode_metadata([40], tables.to(torch.int32), None)
        got = kernels.paged_decode(long_q, kc, vc, md.block_tables, md.seq_lens, md.scale, None)
        torch.testing.assert_close(
            got, cpu.attention(long_q, kv[:1], kv[:1], kc, vc, md), rtol=1e-5, atol=1e-5
        )
        gate_up = torch.randn(3, 2 * 40, generator=g) * 4  # 40: two vectors of 16 and a tail
        torch.testing.assert_close(
            kernels.silu_and_mul(gate_up), cpu.silu_and_mul(gate_up), rtol=1e-6, atol=1e-6
        )
        h, wn = torch.randn(3, 40, generator=g), torch.rand(40, generator=g)
        torch.testing.assert_close(
            kernels.rms_norm(h, wn, 1e-6, None), cpu.rms_norm(h, wn, 1e-6), rtol=1e-6, atol=1e-6
        )
    finally:
        kernels._library.cache_clear()  # later tests load the host's own build again


def test_out_of_range_indices_fall_back_to_the_reference_which_raises(cpu_kernels) -> None:
    k_cache, v_cache = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    k = torch.randn(2, 2, 16)
    assert not kernels.cache_write(k, k, k_cache, v_cache, torch.tensor([3, 16]))  # 16 slots
    assert not k_cache.any()  # nothing written before the bad slot was found
    with pytest.raises(IndexError):
        cpu_kernels.reshape_and_cache(k, k, k_cache, v_cache, torch.tensor([3, 16]))
    q = torch.randn(1, 4, 16)
    tables = torch.tensor([[1, 9]], dtype=torch.int32)  # block 9 of 4
    assert (
        kernels.paged_decode(q, k_cache, v_cache, tables, torch.tensor([6], dtype=torch.int32), 0.25, None)
        is None
    )
    md = _decode_metadata([6], tables, None)
    with pytest.raises(IndexError):
        cpu_kernels.attention(q, k[:1], k[:1], k_cache, v_cache, md)

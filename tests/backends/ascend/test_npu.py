"""Checks that need an Ascend NPU (marker `npu`, skipped elsewhere): every op against the CPU
reference on the same inputs, ACL graph replay against eager, the ACL xTensor, streams, events,
memory info and a one-rank HCCL group. Run with ``pytest -m npu tests/backends/ascend``."""

from __future__ import annotations

import pytest
import torch

from tests.backends.ascend.cases import make_cos_sin, mixed_batch, sampling_case
from xllm.backends.ascend.probe import probe_reason
from xllm.hal import AttentionMetadata, GraphInput, UnmappedMemoryError, get_backend

REASON = probe_reason()
pytestmark = [pytest.mark.npu, pytest.mark.skipif(REASON is not None, reason=f"no NPU: {REASON}")]

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module")
def npu():
    return get_backend("ascend")


@pytest.fixture(scope="module")
def cpu():
    return get_backend("cpu", kernels=False)  # the plain reference ops


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to("npu:0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm(npu, cpu, dtype):
    x, r, w = torch.randn(5, 64, dtype=dtype), torch.randn(5, 64, dtype=dtype), torch.rand(64, dtype=dtype)
    torch.testing.assert_close(
        npu.rms_norm(dev(x), dev(w), 1e-6).cpu(), cpu.rms_norm(x, w, 1e-6), atol=TOL[dtype], rtol=TOL[dtype]
    )
    out, h = npu.rms_norm(dev(x), dev(w), 1e-6, residual=dev(r))
    ref_out, ref_h = cpu.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(h.cpu(), ref_h)
    torch.testing.assert_close(out.cpu(), ref_out, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary(npu, cpu, neox, dtype):
    pos = torch.tensor([0, 7, 31, 2])
    cache = make_cos_sin(64, 64)
    q, k = torch.randn(4, 8, 128, dtype=dtype), torch.randn(4, 2, 128, dtype=dtype)
    rq, rk = cpu.rotary_embedding(pos, q.clone(), k.clone(), cache, neox)
    oq, ok = npu.rotary_embedding(dev(pos), dev(q), dev(k), dev(cache), neox)
    torch.testing.assert_close(oq.cpu(), rq, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(ok.cpu(), rk, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated(npu, cpu, dtype):
    x = torch.randn(6, 256, dtype=dtype)
    torch.testing.assert_close(
        npu.silu_and_mul(dev(x)).cpu(), cpu.silu_and_mul(x), atol=TOL[dtype], rtol=TOL[dtype]
    )
    for a in ("none", "tanh"):
        torch.testing.assert_close(
            npu.gelu_and_mul(dev(x), a).cpu(), cpu.gelu_and_mul(x, a), atol=TOL[dtype], rtol=TOL[dtype]
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reshape_and_cache(npu, cpu, dtype):
    k, v = torch.randn(4, 2, 128, dtype=dtype), torch.randn(4, 2, 128, dtype=dtype)
    slots = torch.tensor([5, -1, 0, 62])
    kc, vc = torch.randn(4, 16, 2, 128, dtype=dtype), torch.randn(4, 16, 2, 128, dtype=dtype)
    dkc, dvc = dev(kc), dev(vc)
    npu.reshape_and_cache(dev(k), dev(v), dkc, dvc, dev(slots))
    cpu.reshape_and_cache(k, v, kc, vc, slots)
    assert torch.equal(dkc.cpu(), kc) and torch.equal(dvc.cpu(), vc)


def to_dev(md: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(
        dev(md.query_start_loc),
        dev(md.seq_lens),
        dev(md.block_tables),
        dev(md.slot_mapping),
        md.max_query_len,
        md.max_seq_len,
        md.scale,
        md.sliding_window,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("split", [False, True])
def test_attention_mixed_batch(cpu, dtype, window, split):
    backend = get_backend("ascend", split_mixed_batches=split)
    q, kc, vc, md, *_ = mixed_batch(dtype, window=window)
    kv = torch.zeros(q.shape[0], kc.shape[2], kc.shape[3], dtype=dtype)
    ref = cpu.attention(q, kv, kv, kc, vc, md)
    out = backend.attention(dev(q), dev(kv), dev(kv), dev(kc), dev(vc), to_dev(md))
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_sampling(npu, cpu):
    logits, sm = sampling_case()
    sm_dev = type(sm)(
        **{
            f: (dev(getattr(sm, f)) if isinstance(getattr(sm, f), torch.Tensor) else getattr(sm, f))
            for f in sm.__slots__
        }
    )
    p_ref, p_npu = cpu.processed_logits(logits, sm), npu.processed_logits(dev(logits), sm_dev).cpu()
    assert torch.equal(p_ref.isinf(), p_npu.isinf())
    out, ref = npu.sample(dev(logits), sm_dev), cpu.sample(logits, sm)
    # Same host uniforms, same probabilities up to rounding: the same tokens.
    assert torch.equal(out.sampled_token_ids.cpu(), ref.sampled_token_ids)
    torch.testing.assert_close(out.top_logprobs.cpu(), ref.top_logprobs, atol=1e-5, rtol=1e-5)


def test_mem_info(npu):
    info = npu.mem_info(0)
    assert 0 < info.free_bytes <= info.total_bytes


def test_streams_and_events(npu):
    s, start, end = (
        npu.create_stream(),
        npu.create_event(enable_timing=True),
        npu.create_event(enable_timing=True),
    )
    with s:
        start.record(s)
        x = torch.randn(1024, 1024, device="npu:0") @ torch.randn(1024, 1024, device="npu:0")
        end.record(s)
    end.synchronize()
    assert end.query() and start.elapsed_time_ms(end) >= 0
    npu.current_stream().wait_event(end)
    npu.synchronize()
    assert x.shape == (1024, 1024)


def test_graph_replay_matches_eager(npu):
    weight = torch.randn(64, 64, device="npu:0")

    def fn(x, scale):
        return npu.silu_and_mul(torch.cat([x @ weight, x], dim=-1) * scale)

    runner = npu.create_graph_runner(
        fn,
        {"x": GraphInput(torch.float32, (64,)), "scale": GraphInput(torch.float32, (1,), 1.0)},
        capture_sizes=[1, 2, 4, 8],
    )
    runner.capture()
    for b in (1, 3, 8):
        x, scale = torch.randn(b, 64, device="npu:0"), torch.rand(b, 1, device="npu:0")
        torch.testing.assert_close(runner.run(x=x, scale=scale), fn(x, scale), atol=1e-4, rtol=1e-4)


def test_graph_replay_of_attention_follows_new_lengths(npu, cpu):
    """Captured once, replayed with other sequence lengths: the capture-safe path reads them."""
    q, kc, vc, md, *_ = mixed_batch(torch.bfloat16)
    kc, vc = dev(kc), dev(vc)
    heads, dim = q.shape[1], q.shape[2]

    def step(q, seq_lens, tables):
        b = q.shape[0]
        meta = AttentionMetadata(
            torch.arange(b + 1, dtype=torch.int32, device=q.device),
            seq_lens,
            tables,
            torch.full((b,), -1, dtype=torch.int64, device=q.device),
            1,
            12,
            dim**-0.5,
        )
        return npu.attention(q, q[:, :2], q[:, :2], kc, vc, meta)

    runner = npu.create_graph_runner(
        step,
        {
            "q": GraphInput(torch.bfloat16, (heads, dim)),
            "seq_lens": GraphInput(torch.int32, (), 1),
            "tables": GraphInput(torch.int32, (3,), 0),
        },
        capture_sizes=[4],
    )
    runner.capture()
    for lens in ([5, 9], [12, 1]):
        qd = torch.randn(2, heads, dim, dtype=torch.bfloat16)
        tables = torch.tensor([[7, 3, 0], [2, 5, 8]], dtype=torch.int32)
        out = runner.run(q=dev(qd), seq_lens=dev(torch.tensor(lens, dtype=torch.int32)), tables=dev(tables))
        meta = AttentionMetadata(
            torch.arange(3, dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32),
            tables,
            torch.full((2,), -1),
            1,
            12,
            dim**-0.5,
        )
        ref = cpu.attention(qd, qd[:, :2], qd[:, :2], kc.cpu(), vc.cpu(), meta)
        torch.testing.assert_close(out.cpu().float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_xtensor_map_view_unmap(npu):
    with npu.create_xtensor(4) as xt:
        page = xt.page_size_bytes
        xt.map(1, 2)
        view = xt.view(page, (2 * page // 4,), torch.float32)
        view.fill_(3.0)
        assert float(view.sum()) == 3.0 * view.numel()
        with pytest.raises(UnmappedMemoryError):
            xt.view(0, (4,), torch.float32)
        del view
        xt.unmap(1, 2)
        assert xt.num_mapped_pages == 0


def test_single_rank_hccl(npu):
    comm = npu.create_communicator(0, 1, "tcp://127.0.0.1:29561")
    try:
        t = torch.ones(4, device="npu:0")
        assert torch.equal(comm.all_reduce(t).cpu(), torch.ones(4))
        assert comm.all_gather(t).shape == (4,)
        comm.barrier()
    finally:
        comm.close()

"""The unified paged-attention kernel (and its split-KV decode path), interpreted on CPU tensors.

Checked against a direct float64 torch computation over the gathered context and against the
CPU reference backend, on batches that stress what the conformance cases do not: many query
blocks per sequence (the binary search that maps programs to sequences), GQA groups that are not
powers of two, head_dim 80, block sizes that are not powers of two, and the split-KV path forced
on small shapes. The last tests prove that the conformance suite catches a kernel whose causal
mask is off by one at block borders: a copy of the kernel module with that bug, made here from
its source, so the production kernel carries no switch for it.
"""

from __future__ import annotations

import importlib.util
import inspect
import math

import pytest
import torch

from xllm.hal import AttentionMetadata


def _batch(seqs, hq, hkv, d, bs, dtype, window=None, seed=0):
    """(cached prefix, query len) per sequence -> q, caches (random block ids) and metadata."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in seqs]
    nblk = [math.ceil(n / bs) for n in seq_lens]
    total = sum(nblk) + 2
    perm = torch.randperm(total, generator=gen)
    width = max(nblk) + 1
    tables = torch.full((len(seqs), width), int(perm[-1]), dtype=torch.int32)
    kc = (50 * torch.randn(total, bs, hkv, d, generator=gen)).to(dtype)  # poison outside contexts
    vc = (50 * torch.randn(total, bs, hkv, d, generator=gen)).to(dtype)
    used = 0
    for i, n in enumerate(nblk):
        tables[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
        for t in range(seq_lens[i]):
            kc[tables[i, t // bs], t % bs] = torch.randn(hkv, d, generator=gen).to(dtype)
            vc[tables[i, t // bs], t % bs] = torch.randn(hkv, d, generator=gen).to(dtype)
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    num_tokens = starts[-1]
    md = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64),
        max_query_len=max(n for _, n in seqs),
        max_seq_len=max(seq_lens),
        scale=d**-0.5,
        sliding_window=window,
    )
    q = torch.randn(num_tokens, hq, d, generator=gen).to(dtype)
    k = torch.zeros(num_tokens, hkv, d, dtype=dtype)  # read from the cache, not from here
    return q, k, kc, vc, md


def _reference(q, kc, vc, md):
    """Softmax attention over each sequence's gathered context, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    bs, hkv = kc.shape[1], kc.shape[2]
    group = q.shape[1] // hkv
    for i in range(md.num_seqs):
        lo, hi = int(md.query_start_loc[i]), int(md.query_start_loc[i + 1])
        n = int(md.seq_lens[i])
        pos = torch.arange(n)
        blocks = md.block_tables[i, pos // bs].long()
        keys = kc[blocks, pos % bs].double().repeat_interleave(group, dim=1)  # [n, hq, d]
        vals = vc[blocks, pos % bs].double().repeat_interleave(group, dim=1)
        qpos = torch.arange(n - (hi - lo), n)
        scores = torch.einsum("thd,nhd->htn", q[lo:hi].double(), keys) * md.scale
        visible = pos[None, :] <= qpos[:, None]
        if md.sliding_window is not None:
            visible &= pos[None, :] > qpos[:, None] - md.sliding_window
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out[lo:hi] = torch.einsum("htn,nhd->thd", scores.softmax(-1), vals)
    return out


def _check(backend, cpu, q, k, kc, vc, md, dtype, **kw):
    """The kernel (through the backend, or launched directly with `kw`) against the float64
    reference and against the CPU reference backend on the same batch."""
    if kw:
        from xllm.backends.cuda.kernels.attention import paged_attention

        got = paged_attention(
            q,
            kc,
            vc,
            md.query_start_loc,
            md.seq_lens,
            md.block_tables,
            md.max_query_len,
            md.max_seq_len,
            md.scale,
            md.sliding_window,
            interpret=True,
            **kw,
        )
    else:
        got = backend.attention(q, k, k, kc, vc, md)
    want = _reference(q, kc, vc, md)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got, cpu.attention(q, k, k, kc, vc, md), rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_many_query_blocks_gqa3_head80(backend, cpu, dtype):
    # 40- and 23-token chunks span many 4-token query blocks (group 3 -> BLOCK_Q 5 of 16 rows).
    seqs = [(0, 40), (5, 1), (9, 23), (31, 1), (16, 2)]
    _check(backend, cpu, *_batch(seqs, hq=6, hkv=2, d=80, bs=16, dtype=dtype), dtype)


@pytest.mark.parametrize("window", [None, 7])
def test_mqa_odd_block_size_sliding_window(backend, cpu, window):
    seqs = [(0, 19), (30, 1), (11, 13)]
    _check(
        backend,
        cpu,
        *_batch(seqs, hq=8, hkv=1, d=32, bs=12, dtype=torch.float16, window=window, seed=1),
        torch.float16,
    )


@pytest.mark.parametrize("window", [None, 50])
def test_split_kv_decode_matches_single_pass(backend, cpu, window):
    # Long decode contexts, forced into 3 splits (one of them partly empty for the short one).
    seqs = [(190, 1), (37, 1), (120, 1)]
    batch = _batch(seqs, hq=4, hkv=2, d=32, bs=16, dtype=torch.float32, window=window, seed=2)
    split = _check(backend, cpu, *batch, torch.float32, num_splits=3)
    single = _check(backend, cpu, *batch, torch.float32, num_splits=1)
    torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-6)


def test_int64_metadata(backend):
    """The contract allows int32 or int64 index tensors; the kernel must take either."""
    q, k, kc, vc, md = _batch([(0, 9), (20, 1), (5, 4)], hq=4, hkv=2, d=16, bs=8, dtype=torch.float32, seed=4)
    want = backend.attention(q, k, k, kc, vc, md)
    md.query_start_loc, md.seq_lens, md.block_tables = (
        md.query_start_loc.long(),
        md.seq_lens.long(),
        md.block_tables.long(),
    )
    torch.testing.assert_close(backend.attention(q, k, k, kc, vc, md), want, rtol=0, atol=0)
    positions = torch.arange(q.shape[0], dtype=torch.int32)
    backend.reshape_and_cache(k, k, kc, vc, md.slot_mapping.clone().fill_(-1).int())
    backend.rotary_embedding(positions, q.clone(), k.clone(), torch.randn(32, 16), True)


def test_backend_splits_a_long_decode_on_its_own(backend, cpu):
    """Through the public op: one 600-token decode is split (interpret mode counts 8 SMs)."""
    from xllm.backends.cuda.kernels.attention import choose_num_splits

    batch = _batch([(599, 1)], hq=4, hkv=2, d=16, bs=16, dtype=torch.float32, seed=5)
    assert choose_num_splits(1, 2, 1, 600, backend._sm_count(torch.device("cpu"))) > 1
    _check(backend, cpu, *batch, torch.float32)


def test_split_heuristic():
    from xllm.backends.cuda.kernels.attention import choose_num_splits

    assert choose_num_splits(1, 8, 1, 8192, num_sms=132) > 1  # one long decode: fill the GPU
    assert choose_num_splits(1, 8, 1, 100, num_sms=132) == 1  # short context: not worth it
    assert choose_num_splits(256, 8, 1, 8192, num_sms=132) == 1  # big batch already fills it
    assert choose_num_splits(1, 8, 5, 8192, num_sms=132) == 1  # prefill chunks never split
    assert choose_num_splits(1, 1, 1, 1 << 20, num_sms=132) <= 16


def test_graph_padding_rows_are_harmless(backend):
    """Rows padded the way graph replay pads them (seq_len 1 over block 0) give finite output
    and leave the real rows' results alone."""
    q, k, kc, vc, md = _batch([(20, 1), (3, 1)], hq=4, hkv=4, d=16, bs=16, dtype=torch.float32, seed=3)
    real = backend.attention(q, k, k, kc, vc, md)
    pad = 2
    md_pad = AttentionMetadata(
        query_start_loc=torch.arange(4 + 1, dtype=torch.int32),
        seq_lens=torch.cat((md.seq_lens, torch.ones(pad, dtype=torch.int32))),
        block_tables=torch.cat(
            (md.block_tables, torch.zeros(pad, md.block_tables.shape[1], dtype=torch.int32))
        ),
        slot_mapping=torch.full((4,), -1, dtype=torch.int64),
        max_query_len=1,
        max_seq_len=md.max_seq_len,
        scale=md.scale,
    )
    qp = torch.cat((q, torch.zeros(pad, *q.shape[1:])))
    kp = torch.zeros(4, *k.shape[1:])
    padded = backend.attention(qp, kp, kp, kc, vc, md_pad)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:2], real)


# ---------------------------------------------------------------------------------- broken kernel

# A plausible off-by-one, made from the production kernel's source: a query also sees the next key
# when that key opens a new cache block, and the key loop's bound reaches one key further so the
# last query of a block can see it. Each line to replace must occur once in kernels/attention.py.
BORDER_BUG_EDITS = (
    ("hi = ctx_len + last_q + 1", "hi = tl.minimum(ctx_len + last_q + 2, seq_len)"),
    (
        "visible = k_pos[None, :] <= q_pos[:, None]",
        "visible = (k_pos[None, :] <= q_pos[:, None]) | ((k_pos[None, :] == q_pos[:, None] + 1)"
        " & (k_pos[None, :] % block_size == 0) & (k_pos[None, :] < seq_len))",
    ),
)


@pytest.fixture(scope="module")
def border_bug_attention(backend, tmp_path_factory):
    """`kernels/attention.py` with the bug above, imported from a file as a module of its own."""
    from xllm.backends.cuda.kernels import attention

    source = inspect.getsource(attention)
    for line, bug in BORDER_BUG_EDITS:
        assert source.count(line) == 1, f"kernels/attention.py no longer has {line!r}: update this test"
        source = source.replace(line, bug)
    path = tmp_path_factory.mktemp("kernels") / "attention_border_bug.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("attention_border_bug", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def border_cases():
    from xllm.hal.conformance import build_cases

    # The prefill and chunk cases put queries right before block borders (15, 31 with bs 16/32).
    cases = build_cases("all", ["prefill", "chunk"])
    assert cases and all(c.op == "attention" for c in cases)
    return cases


def test_conformance_catches_off_by_one_causal_mask(backend, cpu, border_cases, border_bug_attention):
    from xllm.backends.cuda.interpret import CudaInterpretBackend
    from xllm.hal.conformance import Status, run_suite

    class BrokenCausalMask(CudaInterpretBackend):
        def __init__(self) -> None:
            super().__init__()
            self._k_attention = border_bug_attention  # the backend's own _attention launches it

    broken = run_suite(BrokenCausalMask(), cpu, border_cases)
    assert not broken.ok
    failed = broken.failed()
    assert all(r.status is Status.FAIL and "NMSE" in r.detail for r in failed)
    assert {r.dtype for r in failed} == {"float32", "bfloat16", "float16"}


def test_conformance_passes_the_correct_kernel_on_the_same_cases(backend, cpu, border_cases):
    from xllm.hal.conformance import run_suite

    report = run_suite(backend, cpu, border_cases)
    assert report.ok, [f"{r.name}: {r.detail}" for r in report.failed()]

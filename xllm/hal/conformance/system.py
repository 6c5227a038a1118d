"""Case kinds that check a backend against itself: graph replay versus eager, and xTensor memory.

Graph replay: a small decode step built from backend ops (rotary embedding, cache write,
paged attention, RMSNorm, SwiGLU) is wrapped in `create_graph_runner`, captured, and run for a
batch smaller than its bucket, twice in a row (the second step decodes the next token, so it
also reads what the first replay wrote to the cache). Outputs and caches must match the same
function run eagerly on the same backend.

xTensor: map pages, write through a view, read back, unmap, and check that viewing an unmapped
page raises `UnmappedMemoryError` while mapped neighbours keep their data. Backends whose
capabilities say no virtual memory report the case as not supported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from xllm.hal.conformance.cases import DTYPES, Case, make_case, register_kind
from xllm.hal.conformance.compare import Checker
from xllm.hal.conformance.inputs import cos_sin_cache, generator, randn, to_device
from xllm.hal.errors import NotSupportedError, UnmappedMemoryError
from xllm.hal.graphs import GraphInput
from xllm.hal.metadata import AttentionMetadata

# ---------------------------------------------------------------------------------- graph replay


def _build_graph_replay() -> list[Case]:
    # `first_block`: sequence 0 owns block 1, the first usable block, and decodes into its slot 0
    # and 1 while padding rows replay over the null block 0 (a backend that writes padding K/V
    # to block 0 instead of skipping slot -1 must not reach a real token).
    return [
        make_case("graph_replay", dtype, small=True, label=label, B=3, bucket=4, hq=4, hkv=2, d=64, bs=16)
        for dtype in DTYPES
        for label in ("random_blocks", "first_block")
    ]


def _decode_step(
    backend: Any,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos_sin: torch.Tensor,
    weight: torch.Tensor,
    max_seq_len: int,
) -> Callable[..., torch.Tensor]:
    """One decode step of a toy layer, written only with backend ops (what the engine captures)."""

    def step(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        b = q.shape[0]
        q, k = backend.rotary_embedding(positions, q, k, cos_sin, True)
        backend.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
        md = AttentionMetadata(
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=q.device),
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            max_query_len=1,
            # A captured graph cannot look at the batch, so the bound is the block table's reach.
            max_seq_len=max_seq_len,
            scale=q.shape[-1] ** -0.5,
            # Only host copies fixed per bucket may be given inside a captured step (the graph
            # rule of AttentionMetadata): the query layout yes, the lengths no.
            query_start_loc_host=list(range(b + 1)),
        )
        out = backend.attention(q, k, v, k_cache, v_cache, md)
        return backend.silu_and_mul(backend.rms_norm(out.reshape(b, -1), weight, 1e-6))

    return step


def _check_graph_replay(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    p, gen, dtype = case.p, generator(case.seed), case.dtype
    b, hq, hkv, d, bs = p["B"], p["hq"], p["hkv"], p["d"], p["bs"]
    width = 4  # blocks per sequence in the table
    num_blocks = b * width + 1
    # The first decode lands mid-block, on a border, at a block's end (or, for first_block,
    # sequence 0 starts at slot 0 of block 1).
    prefixes = ([0, 16, 31] if case.label == "first_block" else [5, 16, 31])[:b]
    ids = 1 + torch.randperm(num_blocks - 1, generator=gen)[: b * width]
    if case.label == "first_block":
        ids = torch.cat([torch.arange(1, width + 1), ids[ids > width][: (b - 1) * width]])
    tables = ids.reshape(b, width).to(torch.int32)
    cache_shape = (num_blocks, bs, hkv, d)
    k_cache, v_cache = randn(gen, cache_shape, dtype), randn(gen, cache_shape, dtype)
    cos_sin = cos_sin_cache(width * bs, d)
    weight = (1.0 + randn(gen, (hq * d,), torch.float32, 0.1)).to(dtype)
    steps = []
    for step in range(2):
        positions = torch.tensor([n + step for n in prefixes], dtype=torch.int64)
        slots = torch.stack([tables[i, positions[i] // bs].long() * bs + positions[i] % bs for i in range(b)])
        steps.append(
            {
                "q": randn(gen, (b, hq, d), dtype),
                "k": randn(gen, (b, hkv, d), dtype),
                "v": randn(gen, (b, hkv, d), dtype),
                "positions": positions,
                "slot_mapping": slots,
                "seq_lens": (positions + 1).to(torch.int32),
                "block_tables": tables.clone(),
            }
        )
    dev = backend.device()
    # Two independent copies of the caches: one for eager calls, one owned by the graph.
    eager_kc, eager_vc = to_device(k_cache, dev), to_device(v_cache, dev)
    graph_kc, graph_vc = to_device(k_cache, dev), to_device(v_cache, dev)
    consts = to_device((cos_sin, weight), dev)
    eager_fn = _decode_step(backend, eager_kc, eager_vc, *consts, width * bs)
    graph_fn = _decode_step(backend, graph_kc, graph_vc, *consts, width * bs)
    specs = {
        "q": GraphInput(dtype, (hq, d), 0.0),
        "k": GraphInput(dtype, (hkv, d), 0.0),
        "v": GraphInput(dtype, (hkv, d), 0.0),
        # Padding rows: one-token sequences over the null block 0 that write slot -1
        # (AttentionMetadata); a backend may write their K/V into block 0 instead.
        "positions": GraphInput(torch.int64, (), 0),
        "slot_mapping": GraphInput(torch.int64, (), -1),
        "seq_lens": GraphInput(torch.int32, (), 1),
        "block_tables": GraphInput(torch.int32, (width,), 0),
    }
    runner = backend.create_graph_runner(graph_fn, specs, capture_sizes=[1, 2, p["bucket"]])
    if runner.bucket_for(b) != p["bucket"]:
        chk.fail(f"batch {b} should replay bucket {p['bucket']}, runner chose {runner.bucket_for(b)}")
    runner.capture()
    for i, inputs in enumerate(steps):
        eager_out = eager_fn(**to_device(inputs, dev))
        graph_out = runner.run(**to_device(inputs, dev)).clone()  # a view of a static buffer
        backend.synchronize()
        chk.close(f"step {i} output", graph_out, eager_out)
    # Block 0 is the null block: what padding rows leave there is undefined, everything else
    # must equal the eager run, the first usable block's real tokens exactly.
    chk.close("k_cache after replay", graph_kc[1:], eager_kc[1:])
    chk.close("v_cache after replay", graph_vc[1:], eager_vc[1:])
    first = tables[0, 0].item()
    chk.exact(f"block {first} of sequence 0 after replay", graph_kc[first], eager_kc[first])
    chk.exact(f"block {first} of sequence 0 after replay (v)", graph_vc[first], eager_vc[first])


# ---------------------------------------------------------------------------------- xTensor


def _build_xtensor() -> list[Case]:
    return [make_case("xtensor", dtype, small=True, pages=4) for dtype in DTYPES]


def _expect_unmapped(chk: Checker, label: str, view: Callable[[], Any]) -> None:
    try:
        view()
    except UnmappedMemoryError:
        return
    except Exception as exc:  # noqa: BLE001 - any other outcome is the failure being reported
        chk.fail(f"{label}: raised {type(exc).__name__}: {exc}, expected UnmappedMemoryError")
        return
    chk.fail(f"{label}: no UnmappedMemoryError")


def _check_xtensor(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    if not backend.capabilities.virtual_memory:
        raise NotSupportedError(f"backend {backend.name!r} declares no virtual memory")
    dtype, pages = case.dtype, case.p["pages"]
    xt = backend.create_xtensor(pages)
    try:
        ps = xt.page_size_bytes
        per_page = ps // torch.empty((), dtype=dtype).element_size()
        if xt.num_mapped_pages != 0:
            chk.fail(f"a new xTensor has {xt.num_mapped_pages} mapped pages, expected 0")
        _expect_unmapped(chk, "view before any map", lambda: xt.view(0, (per_page,), dtype))
        xt.map(1, 2)
        if not (xt.is_mapped(1) and xt.is_mapped(2) and not xt.is_mapped(0) and xt.num_mapped_pages == 2):
            chk.fail("map(1, 2) did not map exactly pages 1 and 2")
        data = randn(generator(case.seed), (2 * per_page,), dtype).to(backend.device())
        view = xt.view(ps, (2 * per_page,), dtype)
        view.copy_(data)
        backend.synchronize()
        back = xt.view(ps, (2 * per_page,), dtype)
        chk.exact("read back through a second view", back, data)
        _expect_unmapped(chk, "view of page 0 (never mapped)", lambda: xt.view(0, (per_page,), dtype))
        _expect_unmapped(chk, "view reaching into page 3", lambda: xt.view(2 * ps, (per_page + 1,), dtype))
        del view, back  # views must be dropped before their pages are unmapped
        xt.unmap(2)
        if xt.is_mapped(2) or xt.num_mapped_pages != 1:
            chk.fail("unmap(2) did not unmap page 2 only")
        _expect_unmapped(chk, "view of an unmapped page", lambda: xt.view(2 * ps, (per_page,), dtype))
        kept = xt.view(ps, (per_page,), dtype)
        chk.exact("page 1 keeps its data after page 2 is unmapped", kept, data[:per_page])
        del kept
        xt.map(2)  # re-mapping works and the bytes are usable again
        fresh = xt.view(2 * ps, (per_page,), dtype)
        fresh.fill_(1)
        backend.synchronize()
        chk.exact("re-mapped page is writable", fresh, torch.ones(per_page, dtype=dtype))
        del fresh
    finally:
        xt.close()


register_kind(
    "graph_replay",
    _build_graph_replay,
    _check_graph_replay,
    uses_reference=False,
    description="captured decode step replayed for a padded batch vs eager",
)
register_kind(
    "xtensor",
    _build_xtensor,
    _check_xtensor,
    uses_reference=False,
    description="virtual-memory page map/unmap semantics",
)

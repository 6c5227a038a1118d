"""The op mapping covers every HAL op, and the backend's calls follow the documented operator
conventions: checked by running `AscendBackend` on the CPU over `DocumentedNpu`, a stand-in that
computes what the torch_npu API reference documents, against the CPU reference backend."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from tests.backends.ascend.cases import make_cos_sin, mixed_batch, sampling_case
from tests.backends.ascend.documented_npu import DocumentedNpu
from xllm.backends.ascend import op_mapping
from xllm.backends.ascend.backend import AscendBackend
from xllm.backends.ascend.translation import FIA_NO_LIMIT
from xllm.hal import Backend, get_backend

NON_OP_METHODS = {"_mem_info", "_create_xtensor", "_create_graph_runner", "_create_communicator"}
HAL_OPS = sorted(
    name[1:]
    for name, fn in vars(Backend).items()
    if name.startswith("_")
    and not name.startswith("__")
    and getattr(fn, "__isabstractmethod__", False)
    and name not in NON_OP_METHODS
)


def test_hal_ops_are_the_eight_documented_ones():
    assert HAL_OPS == sorted(
        [
            "rms_norm",
            "rotary_embedding",
            "silu_and_mul",
            "gelu_and_mul",
            "reshape_and_cache",
            "attention",
            "processed_logits",
            "sample",
        ]
    )


def test_op_table_covers_every_hal_op():
    assert sorted(op_mapping.OP_TABLE) == HAL_OPS
    for name, mapping in op_mapping.OP_TABLE.items():
        assert mapping.hal_op == name
        assert mapping.operator and mapping.translation


def test_backend_overrides_every_abstract_method_with_the_contract_signature():
    for name in sorted(Backend.__abstractmethods__):
        impl = getattr(AscendBackend, name)
        assert not getattr(impl, "__isabstractmethod__", False), name
        ours = [(p.name, p.kind) for p in inspect.signature(impl).parameters.values()]
        base = [(p.name, p.kind) for p in inspect.signature(getattr(Backend, name)).parameters.values()]
        assert ours == base, name
    assert AscendBackend._create_xtensor is not Backend._create_xtensor
    assert not inspect.isabstract(AscendBackend)


def test_identity_and_capabilities():
    caps = AscendBackend.CAPABILITIES
    assert (AscendBackend.name, AscendBackend.device_type) == ("ascend", "npu")
    assert caps.dtypes == (torch.float32, torch.bfloat16, torch.float16)
    assert caps.graph_capture and caps.virtual_memory and caps.collective_backend == "hccl"


@pytest.fixture()
def npu() -> DocumentedNpu:
    return DocumentedNpu()


@pytest.fixture()
def backend(npu) -> AscendBackend:
    return AscendBackend(npu_module=npu)


@pytest.fixture(scope="module")
def cpu():
    return get_backend("cpu", kernels=False)  # the plain reference ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_uses_npu_rms_norm_and_add_rms_norm(backend, npu, cpu, dtype):
    torch.manual_seed(0)
    x, r, w = torch.randn(3, 16, dtype=dtype), torch.randn(3, 16, dtype=dtype), torch.randn(16, dtype=dtype)
    assert torch.equal(backend.rms_norm(x, w, 1e-6), cpu.rms_norm(x, w, 1e-6))
    out, h = backend.rms_norm(x, w, 1e-6, residual=r)
    ref_out, ref_h = cpu.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(h, ref_h) and torch.equal(out, ref_out)
    assert npu.names() == ["npu_rms_norm", "npu_add_rms_norm"]
    # A weight in another dtype than x cannot go to the fused op: torch formula, no call.
    backend.rms_norm(x, w.float(), 1e-6) if dtype != torch.float32 else None
    assert npu.names()[-1] == "npu_add_rms_norm"


@pytest.mark.parametrize("neox", [True, False])
def test_rotary_uses_npu_rotary_mul_in_bsnd_float32(backend, npu, cpu, neox):
    torch.manual_seed(1)
    pos = torch.tensor([0, 5, 9])
    cache = make_cos_sin(16, 8)
    q, k = torch.randn(3, 4, 12, dtype=torch.bfloat16), torch.randn(3, 2, 12, dtype=torch.bfloat16)
    rq, rk = cpu.rotary_embedding(pos, q.clone(), k.clone(), cache, neox)
    oq, ok = backend.rotary_embedding(pos, q.clone(), k.clone(), cache, neox)
    torch.testing.assert_close(oq, rq, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ok, rk, atol=1e-2, rtol=1e-2)
    call = npu.calls[0][1]
    assert call["x"].shape == (1, 3, 4, 8) and call["x"].dtype == torch.float32
    assert call["r1"].shape == (1, 3, 1, 8) and call["rotary_mode"] == ("half" if neox else "interleave")


@pytest.mark.parametrize("neox", [True, False])
def test_torch_rotary_mul_computes_what_npu_rotary_mul_documents(npu, neox):
    """Past npu_rotary_mul's limits the backend runs `torch_ops.rotary_mul` instead, and its cos/sin
    layout is built for the operator: the helper must compute what the reference documents."""
    from xllm.backends.ascend import torch_ops

    torch.manual_seed(3)
    x = torch.randn(1, 3, 4, 8)
    cos, sin = torch.rand(1, 3, 1, 8) * 2 - 1, torch.rand(1, 3, 1, 8) * 2 - 1  # documented range [-1, 1]
    want = npu.npu_rotary_mul(x, cos, sin, rotary_mode="half" if neox else "interleave")
    torch.testing.assert_close(torch_ops.rotary_mul(x, cos, sin, neox), want)


def test_gated_activations(backend, npu, cpu):
    x = torch.randn(4, 10, dtype=torch.float16)
    torch.testing.assert_close(backend.silu_and_mul(x), cpu.silu_and_mul(x))
    for approx in ("none", "tanh"):
        torch.testing.assert_close(backend.gelu_and_mul(x, approx), cpu.gelu_and_mul(x, approx))
    assert npu.names() == ["npu_swiglu"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reshape_and_cache_skips_negative_slots(backend, npu, cpu, dtype):
    torch.manual_seed(2)
    k, v = torch.randn(4, 2, 8, dtype=dtype), torch.randn(4, 2, 8, dtype=dtype)
    slots = torch.tensor([5, -1, 0, 12])
    caches = [torch.zeros(4, 4, 2, 8, dtype=dtype) for _ in range(4)]
    backend.reshape_and_cache(k, v, caches[0], caches[1], slots)
    cpu.reshape_and_cache(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    if dtype == torch.bfloat16:
        ((name, call),) = npu.calls
        # The skipped row repeats the first written row (same slot, same values) on the device.
        assert name == "_npu_reshape_and_cache" and call["slot_indices"].tolist() == [5, 5, 0, 12]
        assert call["key"].shape == (4, 2, 8) and torch.equal(call["key"][1], call["key"][0])
    else:
        assert npu.calls == []  # the ATB op takes fp16/bf16 only


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_reshape_and_cache_reads_no_slot_on_the_host(npu, cpu, dtype):
    """The cache write never waits for the device: no slot is read back, whatever the slots
    (some skipped, none skipped, all skipped), and a slot tensor rewritten in place is used as is."""
    from tests.backends.host_reads import DeviceOnlyTensor, plain

    class StandIn(DocumentedNpu):  # the device itself may read its inputs
        def _npu_reshape_and_cache(self, **kw):
            super()._npu_reshape_and_cache(**{name: plain(t) for name, t in kw.items()})

    backend = AscendBackend(npu_module=StandIn())
    torch.manual_seed(4)
    k, v = torch.randn(3, 1, 4, dtype=dtype), torch.randn(3, 1, 4, dtype=dtype)
    ours = [torch.randn(2, 4, 1, 4, dtype=dtype) for _ in range(2)]
    ref = [c.clone() for c in ours]
    slots = torch.tensor([1, 2, 7])
    for values in ([1, 2, 7], [-1, 0, 6], [-1, -1, -1], [5, -1, -1]):
        slots.copy_(torch.tensor(values))  # the next step rewrites the slot buffer in place
        backend.reshape_and_cache(k, v, ours[0], ours[1], slots.as_subclass(DeviceOnlyTensor))
        cpu.reshape_and_cache(k, v, ref[0], ref[1], slots)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]), values


def test_capture_path_cache_write_skips_negative_slots(backend, cpu):
    torch.manual_seed(3)
    k = torch.randn(3, 2, 4)
    slots = torch.tensor([6, -1, 2])
    ours = [torch.randn(3, 4, 2, 4) for _ in range(2)]
    ref = [c.clone() for c in ours]
    backend._capturing = True
    backend.reshape_and_cache(k, k, ours[0], ours[1], slots)
    cpu.reshape_and_cache(k, k, ref[0], ref[1], slots)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("split", [False, True])
def test_attention_fia_call_for_the_mixed_batch(npu, cpu, window, split):
    backend = AscendBackend(npu_module=npu, split_mixed_batches=split)
    q, kc, vc, md, *_ = mixed_batch(torch.bfloat16, window=window)
    kv = torch.zeros(q.shape[0], kc.shape[2], kc.shape[3], dtype=torch.bfloat16)
    out = backend.attention(q, kv, kv, kc, vc, md)
    ref = cpu.attention(q, kv, kv, kc, vc, md)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    calls = [c for n, c in npu.calls if n == "npu_fused_infer_attention_score"]
    pre = FIA_NO_LIMIT if window is None else window - 1
    mode = 3 if window is None else 4
    # Batch: decodes (seq 0, 1), the prefill chunk (seq 2), then the graph padding row (seq 3).
    expected = [([1, 2], [5, 9]), ([4], [10]), ([1], [1])] if split else [([1, 2, 6, 7], [5, 9, 10, 1])]
    assert [(c["actual_seq_lengths"], c["actual_seq_lengths_kv"]) for c in calls] == expected
    for c in calls:
        assert (c["sparse_mode"], c["pre_tokens"], c["next_tokens"], c["input_layout"]) == (
            mode,
            pre,
            0,
            "TND",
        )
        assert (c["num_heads"], c["num_key_value_heads"], c["block_size"]) == (4, 2, 4)
        assert c["key"].shape == (9, 4, 16)  # cache viewed [blocks, block_size, Hkv * D]
        assert (
            c["atten_mask"].dtype == torch.int8
            and int(c["atten_mask"][0, 1]) == 1
            and int(c["atten_mask"][1, 0]) == 0
        )
    if not split:
        assert calls[0]["block_table"].tolist() == md.block_tables.tolist()


def test_attention_float32_and_capture_use_the_torch_path(backend, npu, cpu):
    q, kc, vc, md, *_ = mixed_batch(torch.float32)
    kv = torch.zeros(q.shape[0], kc.shape[2], kc.shape[3])
    torch.testing.assert_close(backend.attention(q, kv, kv, kc, vc, md), cpu.attention(q, kv, kv, kc, vc, md))
    qb, kcb, vcb, mdb, *_ = mixed_batch(torch.bfloat16)
    backend._capturing = True
    kvb = kv.to(torch.bfloat16)
    torch.testing.assert_close(
        backend.attention(qb, kvb, kvb, kcb, vcb, mdb).float(),
        cpu.attention(qb, kvb, kvb, kcb, vcb, mdb).float(),
        atol=2e-2,
        rtol=2e-2,
    )
    assert npu.calls == []


def test_sampling_matches_cpu_backend(backend, cpu):
    logits, sm = sampling_case()
    ours, ref = backend.sample(logits, sm), cpu.sample(logits, sm)
    assert torch.equal(ours.sampled_token_ids, ref.sampled_token_ids)
    torch.testing.assert_close(ours.top_logprobs, ref.top_logprobs)
    p_ours, p_ref = backend.processed_logits(logits, sm), cpu.processed_logits(logits, sm)
    assert torch.equal(p_ours.isinf(), p_ref.isinf())


def test_unknown_option_is_rejected(npu):
    with pytest.raises(TypeError, match="unknown options"):
        AscendBackend(npu_module=npu, graph_mode="x")


@pytest.mark.parametrize("split", [False, True])
def test_fia_lengths_come_from_the_host_copies(npu, cpu, split):
    """FIA's actual_seq_lengths lists are the metadata's host copies: no length tensor is read
    back (it would wait for the device), and the result is the reference's."""
    from tests.backends.host_reads import device_only

    backend = AscendBackend(npu_module=npu, split_mixed_batches=split)
    q, kc, vc, md, qsl, seq_lens, _ = mixed_batch(torch.bfloat16)
    kv = torch.zeros(q.shape[0], kc.shape[2], kc.shape[3], dtype=torch.bfloat16)
    guarded = device_only(dataclasses.replace(md, query_start_loc_host=qsl, seq_lens_host=seq_lens))
    got = backend.attention(q, kv, kv, kc, vc, guarded)
    calls = [c for name, c in npu.calls if name == "npu_fused_infer_attention_score"]
    assert calls
    assert [x for c in calls for x in c["actual_seq_lengths_kv"]] == seq_lens
    if not split:
        assert calls[0]["actual_seq_lengths"] == qsl[1:]
    torch.testing.assert_close(
        got.float(), cpu.attention(q, kv, kv, kc, vc, md).float(), atol=2e-2, rtol=2e-2
    )


@pytest.mark.parametrize("split", [False, True])
def test_conformance_op_cases_pass_under_documented_semantics(split):
    """Every op case of the HAL conformance suite, with the backend on the CPU over DocumentedNpu:
    the argument translation is consistent with the documented operator semantics for all the
    suite's shapes (GQA/MQA, windows, mixed/chunked batches). Hardware behaviour is checked by
    `xllm conformance --backend ascend` on an NPU."""
    from xllm.hal.conformance.cases import build_cases
    from xllm.hal.conformance.runner import run_suite

    class Simulated(AscendBackend):
        device_type = "cpu"

        def synchronize(self, device_index: int = 0) -> None:
            pass

    backend = Simulated(npu_module=DocumentedNpu(), split_mixed_batches=split)
    # Comm cases need two devices (here: none); the op cases are what the translation must pass.
    cases = [c for c in build_cases("all") if c.op not in ("graph_replay", "xtensor", "comm")]
    assert {c.op for c in cases} >= {"attention", "rms_norm", "reshape_and_cache", "sample"}
    report = run_suite(backend, get_backend("cpu"), cases)
    failed = [
        f"{r.name}: {r.status.value} {r.detail[:200]}" for r in report.results if r.status.value != "PASS"
    ]
    assert not failed, "\n".join(failed)


def test_fia_arguments_are_planned_once_per_step(backend, monkeypatch):
    """Every layer of a step shares the metadata: the host read and FIA planning happen once."""
    planned = []
    original = AscendBackend._plan_fia_calls

    def counting(md, key):
        planned.append(key)
        return original(md, key)

    monkeypatch.setattr(AscendBackend, "_plan_fia_calls", staticmethod(counting))
    q, kc, vc, md, *_ = mixed_batch(torch.bfloat16)
    kv = torch.zeros(q.shape[0], kc.shape[2], kc.shape[3], dtype=torch.bfloat16)
    for _layer in range(3):
        backend.attention(q, kv, kv, kc, vc, md)
    assert len(planned) == 1
    md = dataclasses.replace(md)  # the next step: the engine builds new metadata every step
    backend.attention(q, kv, kv, kc, vc, md)
    assert len(planned) == 2


def test_porting_guide_lists_every_mapped_operator():
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[3] / "docs" / "PORTING.md").read_text()
    for mapping in op_mapping.OP_TABLE.values():
        assert f"`{mapping.hal_op}`" in guide
        for operator in mapping.operator.replace("torch_npu.", "").split(" / "):
            assert operator in guide, operator

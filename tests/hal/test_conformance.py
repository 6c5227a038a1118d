"""The conformance suite itself: its case list, its NumPy oracle, its runner and `xllm conformance`.

The CPU backend must pass every case against the independent NumPy oracle; the CLI must report
unknown and unavailable backends with exit status 2 and a one-line reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
import torch

import xllm.cli.main as cli_main
from xllm.hal import AttentionMetadata, SamplingMetadata, get_backend, register_backend, unregister_backend
from xllm.hal.conformance import (
    DTYPES,
    NumpyReference,
    Status,
    build_cases,
    nmse,
    run_suite,
    threshold_for,
)
from xllm.hal.errors import NotSupportedError

CONTRACT_OPS = (
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "gelu_and_mul",
    "reshape_and_cache",
    "attention",
    "processed_logits",
    "sample",
)
SYSTEM_KINDS = ("graph_replay", "xtensor", "comm")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def xllm(argv: list[str]) -> int:
    """Runs `xllm ARGV` through the real CLI entry point, with only the conformance subcommand
    registered so that other subcommands' imports cannot affect these tests."""
    saved = cli_main.SUBCOMMAND_MODULES
    cli_main.SUBCOMMAND_MODULES = ("xllm.cli.conformance",)
    try:
        return cli_main.main(argv)
    finally:
        cli_main.SUBCOMMAND_MODULES = saved


# ---------------------------------------------------------------------------------- case list


def test_case_names_are_unique_and_readable() -> None:
    cases = build_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert "attention(B=3,hq=8,hkv=2,d=64,bs=16,win=None,mixed)[float16]" in names
    # Every dtype of a case shares the seed, so a failure in one dtype can be compared to another.
    by_base: dict[str, set[int]] = {}
    for c in cases:
        by_base.setdefault(c.base_name, set()).add(c.seed)
    assert all(len(seeds) == 1 for seeds in by_base.values())


@pytest.mark.parametrize("size", ["all", "small"])
def test_cases_cover_every_op_in_every_dtype(size: str) -> None:
    cases = build_cases(size)
    covered = {(c.op, c.dtype) for c in cases}
    for op in CONTRACT_OPS + SYSTEM_KINDS:
        for dtype in DTYPES:
            assert (op, dtype) in covered, f"{op} {dtype} missing from size={size}"


def test_attention_cases_cover_the_shapes_the_issue_asks_for() -> None:
    cases = [c for c in build_cases() if c.op == "attention"]
    ratios = {c.p["hq"] // c.p["hkv"] for c in cases}
    assert {1, 4, 8} <= ratios
    assert {64, 128} <= {c.p["d"] for c in cases}
    assert {16, 32} <= {c.p["bs"] for c in cases}
    assert {None} < {c.p["win"] for c in cases}
    assert any(c.p["B"] == 1 for c in cases)
    # Mixed batches (decode and prefill chunks together) and prefixes crossing block borders.
    assert any({q for _, q in c.p["_seqs"]} > {1} for c in cases if c.label == "mixed")
    assert any(
        prefix % c.p["bs"] and (prefix + q) // c.p["bs"] > prefix // c.p["bs"]
        for c in cases
        for prefix, q in c.p["_seqs"]
    )


def test_filter_selects_by_op_or_substring() -> None:
    assert {c.op for c in build_cases(filters=["rms_norm"])} == {"rms_norm"}
    assert all("win=8" in c.name for c in build_cases(filters=["win=8"]))
    assert build_cases(filters=["no-such-case"]) == []


def test_thresholds_are_written_down_per_op_and_dtype() -> None:
    for op in CONTRACT_OPS + SYSTEM_KINDS:
        for dtype in DTYPES:
            assert threshold_for(op, dtype) >= 0
    assert threshold_for("reshape_and_cache", torch.bfloat16) == 0.0  # a copy is exact
    assert (
        threshold_for("rms_norm", torch.float32)
        < threshold_for("rms_norm", torch.float16)
        < threshold_for("rms_norm", torch.bfloat16)
    )


def test_nmse_is_ggml_definition() -> None:
    b = torch.tensor([1.0, 2.0, 2.0])
    a = torch.tensor([1.0, 2.0, 3.0])
    assert nmse(a, b) == pytest.approx(1.0 / 9.0)
    assert nmse(b, b) == 0.0
    assert math.isinf(nmse(a, torch.zeros(3)))


# ---------------------------------------------------------------------------------- NumPy oracle, by hand


def test_numpy_rms_norm_by_hand() -> None:
    ref = NumpyReference()
    x = torch.tensor([[3.0, 4.0]])
    out = ref.rms_norm(x, torch.tensor([1.0, 2.0]), eps=1e-12)
    rms = math.sqrt((9 + 16) / 2)
    assert out.numpy() == pytest.approx(np.array([[3 / rms, 8 / rms]]))
    normed, h = ref.rms_norm(x, torch.ones(2), 1e-12, residual=torch.tensor([[1.0, -4.0]]))
    assert h.tolist() == [[4.0, 0.0]]
    assert normed.numpy() == pytest.approx(np.array([[math.sqrt(2), 0.0]]))


def test_numpy_rotary_by_hand() -> None:
    ref = NumpyReference()
    angle = 0.3
    # rot_dim 2 of head_dim 4: the first pair rotates by `angle`, the rest passes through.
    cache = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)]])
    q = torch.tensor([[[1.0, 0.0, 5.0, 6.0]]])
    for neox in (True, False):
        out_q, _ = ref.rotary_embedding(torch.tensor([1]), q, q.clone(), cache, neox)
        assert out_q[0, 0].numpy() == pytest.approx([math.cos(angle), math.sin(angle), 5.0, 6.0])


def test_numpy_attention_by_hand() -> None:
    """One sequence of 3 tokens, one head, block size 2, blocks stored out of order; window 2."""
    ref = NumpyReference()
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    values = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    kc = torch.full((3, 2, 1, 2), 99.0)
    vc = torch.full((3, 2, 1, 2), 99.0)
    table = [2, 0]  # token t -> block table[t // 2], offset t % 2
    for t in range(3):
        kc[table[t // 2], t % 2, 0] = keys[t]
        vc[table[t // 2], t % 2, 0] = values[t]
    q = torch.tensor([[[1.0, 2.0]]])  # the last token (position 2) only: a decode
    for window in (None, 2):
        md = AttentionMetadata(
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
            seq_lens=torch.tensor([3], dtype=torch.int32),
            block_tables=torch.tensor([table], dtype=torch.int32),
            slot_mapping=torch.tensor([1], dtype=torch.int64),
            max_query_len=1,
            max_seq_len=3,
            scale=0.5,
            sliding_window=window,
        )
        out = ref.attention(q, keys[2:].unsqueeze(1), values[2:].unsqueeze(1), kc, vc, md)
        visible = range(3) if window is None else range(1, 3)
        scores = np.array([float(keys[t] @ q[0, 0]) * 0.5 for t in visible])
        p = np.exp(scores - scores.max())
        p /= p.sum()
        want = sum(p[i] * values[t].numpy() for i, t in enumerate(visible))
        assert out[0, 0].numpy() == pytest.approx(want)


def test_numpy_processed_logits_by_hand() -> None:
    ref = NumpyReference()
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 4)
    sm = SamplingMetadata.from_lists(
        temperature=[2.0, 1.0, 1.0, 0.0],
        top_k=[0, 2, 0, 0],
        top_p=[1.0, 1.0, 0.7, 1.0],
        repetition_penalty=[1.0, 1.0, 1.0, 2.0],
        output_token_ids=[[], [], [], [0, 3]],
        vocab_size=4,
    )
    out = ref.processed_logits(logits, sm).numpy()
    ninf = -np.inf
    assert out[0] == pytest.approx([1.0, 0.5, 0.0, -0.5])  # temperature only
    assert out[1].tolist() == [2.0, 1.0, ninf, ninf]  # top-k 2
    # top-p 0.7: softmax([2,1,0,-1]) = [.64, .24, .09, .03]; the head {0, 1} reaches 0.7.
    assert out[2].tolist() == [2.0, 1.0, ninf, ninf]
    assert out[3].tolist() == [1.0, 1.0, 0.0, -2.0]  # greedy: repetition penalty only


# ---------------------------------------------------------------------------------- runner


@pytest.mark.slow
def test_cpu_passes_every_case_against_numpy_in_process() -> None:
    # The CLI test below runs the same cases; this one gives a readable list when something fails.
    report = run_suite(get_backend("cpu"), NumpyReference(), build_cases("all"))
    assert report.ok, [(r.name, r.detail) for r in report.failed()]


class _PartialCpu:
    """Factory of CPU-backend subclasses with one op replaced."""

    @staticmethod
    def make(op: str, exc: Exception) -> object:
        from xllm.backends.cpu.backend import CpuBackend

        def broken(self, *args, **kwargs):
            raise exc

        cls = type(f"Broken_{op}", (CpuBackend,), {f"_{op}": broken, "name": f"broken-{op}"})
        return cls()


def test_not_supported_is_skip_and_other_exceptions_are_errors() -> None:
    cases = build_cases("small", filters=["silu_and_mul", "gelu_and_mul"])
    skipping = _PartialCpu.make("silu_and_mul", NotSupportedError("no silu here"))
    report = run_suite(skipping, NumpyReference(), cases)
    assert report.ok
    assert {r.status for r in report.results if r.op == "silu_and_mul"} == {Status.SKIP}
    assert all("not supported" in r.detail for r in report.results if r.op == "silu_and_mul")
    assert {r.status for r in report.results if r.op == "gelu_and_mul"} == {Status.PASS}
    crashing = _PartialCpu.make("gelu_and_mul", RuntimeError("kernel exploded"))
    report = run_suite(crashing, NumpyReference(), cases)
    assert not report.ok
    errors = [r for r in report.results if r.status == Status.ERROR]
    assert {r.op for r in errors} == {"gelu_and_mul"}
    assert all("RuntimeError: kernel exploded" in r.detail for r in errors)


def test_nan_fails_before_the_norm() -> None:
    from xllm.backends.cpu.backend import CpuBackend

    class NanSilu(CpuBackend):
        name = "nan-silu"

        def _silu_and_mul(self, x):
            out = super()._silu_and_mul(x)
            out.view(-1)[0] = float("nan")
            return out

    report = run_suite(NanSilu(), NumpyReference(), build_cases("small", filters=["silu_and_mul"]))
    assert all(r.status == Status.FAIL and "NaN" in r.detail for r in report.results)


def test_a_sampler_that_is_not_random_fails_the_seeded_cases() -> None:
    from xllm.backends.cpu.backend import CpuBackend

    class ArgmaxSampler(CpuBackend):
        """Reproducible, in-support, batch-invariant... and never random."""

        name = "argmax-sampler"

        def _sample(self, logits, sampling):
            greedy = dataclasses.replace(
                sampling, temperature=torch.zeros_like(sampling.temperature), all_greedy=True
            )
            return super()._sample(logits, greedy)

    report = run_suite(ArgmaxSampler(), NumpyReference(), build_cases(filters=["sample("]))
    failed = {r.name for r in report.results if r.status == Status.FAIL}
    # Every mix with random rows (seeded, and the min-tokens ban with random rows) must catch it.
    assert failed == {r.name for r in report.results if "seeded" in r.name or "banned" in r.name}
    assert all("not random" in r.detail for r in report.results if r.name in failed)


def test_a_sampler_with_another_random_stream_fails_the_float32_seeded_cases() -> None:
    from xllm.backends.cpu.backend import CpuBackend
    from xllm.hal import sampling_ops

    class FlippedDraws(CpuBackend):
        """Seeded, reproducible, batch-invariant and of the right law (u -> 1 - u), but not the
        contract's random stream: the same seed must give the same tokens on every backend."""

        name = "flipped-draws"

        def _sample(self, logits, sampling):
            draws = sampling_ops.random_draws(sampling)
            flipped = sampling_ops.RandomDraws(draws.rows, 1.0 - draws.uniforms)
            return sampling_ops.sample(logits, sampling, flipped)

    report = run_suite(FlippedDraws(), NumpyReference(), build_cases(filters=["sample("]))
    failed = {r.name for r in report.results if r.status == Status.FAIL}
    random_float32 = [r.name for r in report.results if r.dtype == "float32" and "greedy" not in r.name]
    assert random_float32 and failed == set(random_float32)
    assert all("seeded random tokens == reference" in r.detail for r in report.results if r.name in failed)


# ---------------------------------------------------------------------------------- CLI


def test_cli_cpu_against_numpy_passes_and_writes_json(tmp_path, capsys) -> None:
    path = tmp_path / "r.json"
    assert xllm(["conformance", "--backend", "cpu", "--against", "numpy", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "cpu vs numpy" in out and "0 failed" in out
    doc = json.loads(path.read_text())
    assert doc["backend"] == "cpu" and doc["against"] == "numpy"
    assert doc["summary"]["fail"] == doc["summary"]["error"] == 0
    assert doc["summary"]["pass"] == doc["summary"]["total"] == len(doc["cases"])
    assert {"torch", "device"} <= set(doc["environment"])
    assert doc["environment"]["torch"] == torch.__version__
    covered = {(c["op"], c["dtype"]) for c in doc["cases"]}
    for op in CONTRACT_OPS:
        for dtype in DTYPE_NAMES:
            assert (op, dtype) in covered
    for case in doc["cases"]:
        assert {"name", "op", "dtype", "nmse", "max_abs", "threshold", "status"} <= set(case)


def test_cli_filter_and_table(capsys) -> None:
    assert xllm(["conformance", "--backend", "cpu", "--filter", "reshape_and_cache"]) == 0
    out = capsys.readouterr().out
    assert "reshape_and_cache(" in out and "attention(" not in out
    assert out.splitlines()[1].split() == ["CASE", "NMSE", "MAX-ABS", "THRESHOLD", "STATUS"]


def test_cli_unknown_backend_exits_2(capsys) -> None:
    assert xllm(["conformance", "--backend", "no-such-backend"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xllm conformance: error: ") and "no-such-backend" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_unavailable_backend_exits_2_with_reason(capsys) -> None:
    from xllm.backends.cpu.backend import CpuBackend

    class Absent(CpuBackend):
        name: ClassVar[str] = "absent-accel"

        @classmethod
        def probe(cls, **options: object) -> str | None:
            return "no absent-accel device on this machine"

    register_backend("absent-accel", Absent)
    try:
        assert xllm(["conformance", "--backend", "absent-accel"]) == 2
    finally:
        unregister_backend("absent-accel")
    err = capsys.readouterr().err
    assert "xllm conformance: error:" in err and "no absent-accel device on this machine" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_without_interpret_is_unavailable_here(capsys) -> None:
    assert xllm(["conformance", "--backend", "cuda", "--filter", "rms_norm"]) == 2
    assert "xllm conformance: error:" in capsys.readouterr().err


def test_cli_refuses_backend_against_itself(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without its fused kernels, the CPU backend against its plain ops would compare a thing with
    # itself: that passes trivially and proves nothing.
    from xllm.backends.cpu import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)
    assert xllm(["conformance", "--backend", "cpu", "--against", "cpu"]) == 2
    assert "itself" in capsys.readouterr().err


def test_cli_checks_the_cpu_kernels_against_the_plain_cpu_ops(capsys) -> None:
    from xllm.backends.cpu import kernels

    if not kernels.available():
        pytest.skip("no C compiler here: the CPU backend runs its plain ops only")
    filters = ["--filter", "rms_norm", "--filter", "attention", "--filter", "linear"]
    assert xllm(["conformance", "--backend", "cpu", "--against", "cpu", "--size", "small", *filters]) == 0
    out = capsys.readouterr().out
    assert "cpu (cpu) against cpu" in out and " 0 failed" in out


def test_cli_no_matching_case_exits_2(capsys) -> None:
    assert xllm(["conformance", "--backend", "cpu", "--filter", "no-such-case"]) == 2


def test_cli_failure_exits_1(tmp_path, capsys) -> None:
    from xllm.backends.cpu.backend import CpuBackend

    class OffByOne(CpuBackend):
        name: ClassVar[str] = "off-by-one"

        def _silu_and_mul(self, x):
            return super()._silu_and_mul(x) + 1

    register_backend("off-by-one", OffByOne)
    try:
        path = tmp_path / "r.json"
        assert (
            xllm(
                [
                    "conformance",
                    "--backend",
                    "off-by-one",
                    "--against",
                    "numpy",
                    "--filter",
                    "silu",
                    "--json",
                    str(path),
                ]
            )
            == 1
        )
    finally:
        unregister_backend("off-by-one")
    doc = json.loads(path.read_text())
    assert doc["summary"]["fail"] == doc["summary"]["total"] > 0
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cli_cuda_interpreted_small_set_passes(tmp_path) -> None:
    # A fresh process, as a user runs it: TRITON_INTERPRET=1 must be set before triton is first
    # imported (its standard-library @jit helpers are built at import time), which another test
    # in this process may already have done.
    path = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xllm",
            "conformance",
            "--backend",
            "cuda",
            "--interpret",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(path.read_text())
    assert doc["options"]["size"] == "small" and doc["options"]["interpret"] is True
    assert {c["op"] for c in doc["cases"]} >= set(CONTRACT_OPS)

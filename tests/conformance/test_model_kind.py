"""The whole-model conformance kind: greedy decode through the engine, checked end to end.

The CPU backend must decode like Hugging Face transformers (the oracle for ``--against numpy``)
and like itself through the engine (``--against cpu``); a CPU backend with one plausible kernel
bug (GPT-J-style RoPE instead of NeoX, attention that ignores the sliding window) must fail the
model cases that exercise it. The default run checks only float32 Llama; the rest is ``slow``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

import xllm.cli.main as cli_main
from xllm.backends.cpu.backend import CpuBackend
from xllm.conformance.model import Decode, compare_decodes, model_kind_registered
from xllm.hal import AttentionMetadata, get_backend
from xllm.hal.conformance import Checker, NumpyReference, Status, build_cases, kinds, run_suite, threshold_for

LLAMA_F32 = "model(family=llama,lens=3x17x31x40,new=12)[float32]"


class GptjRope(CpuBackend):
    """Rotates interleaved pairs (GPT-J) where the model asks for rotated halves (NeoX)."""

    name: ClassVar[str] = "cpu-gptj-rope"

    def _rotary_embedding(self, positions, q, k, cos_sin_cache, neox_style):
        return super()._rotary_embedding(positions, q, k, cos_sin_cache, not neox_style)


class WindowlessAttention(CpuBackend):
    """Attends to the whole context even when the metadata sets a sliding window."""

    name: ClassVar[str] = "cpu-windowless"

    def _attention(self, q, k, v, k_cache, v_cache, metadata: AttentionMetadata) -> torch.Tensor:
        return super()._attention(
            q, k, v, k_cache, v_cache, dataclasses.replace(metadata, sliding_window=None)
        )


class SecondCpu(CpuBackend):
    """A healthy CPU backend under another name, to check a backend against the CPU reference."""

    name: ClassVar[str] = "cpu-second"


def model_cases(*filters: str) -> list:
    with model_kind_registered():
        return build_cases("all", list(filters) or ["model"])


def run_model_cases(backend, reference, cases):
    with model_kind_registered():
        return run_suite(backend, reference, cases)


def xllm(argv: list[str]) -> int:
    saved = cli_main.SUBCOMMAND_MODULES
    cli_main.SUBCOMMAND_MODULES = ("xllm.cli.conformance",)
    try:
        return cli_main.main(argv)
    finally:
        cli_main.SUBCOMMAND_MODULES = saved


# ---------------------------------------------------------------------------------- case list


def test_model_cases_cover_every_family_and_dtype_and_only_llama_f32_is_small() -> None:
    cases = [c for c in model_cases() if c.op == "model"]
    assert {(c.p["family"], c.dtype) for c in cases} == {
        (f, d)
        for f in ("llama", "qwen2", "qwen3", "mistral")
        for d in (torch.float32, torch.bfloat16, torch.float16)
    }
    assert len({c.name for c in cases}) == len(cases) == 12
    assert [c.name for c in cases if c.small] == [LLAMA_F32]
    # The prompts cross the 16-token block border and one exceeds Mistral's 32-token window.
    lens = cases[0].p["lens"]
    assert min(lens) < 16 < max(lens) and max(lens) > 32
    # Every dtype of a family decodes the same prompts.
    assert len({c.seed for c in cases if c.p["family"] == "llama"}) == 1


def test_model_kind_is_registered_only_inside_its_scope() -> None:
    assert "model" not in kinds()
    with model_kind_registered():
        assert "model" in kinds()
    assert "model" not in kinds()
    assert not any(c.op == "model" for c in build_cases("all"))


def test_thresholds_are_documented_for_the_model_kind() -> None:
    assert threshold_for("model", torch.float32) <= 1e-6
    assert threshold_for("model", torch.bfloat16) > threshold_for("model", torch.float16)


def test_cli_lists_model_cases_and_small_keeps_llama_f32(capsys) -> None:
    assert xllm(["conformance", "--backend", "cpu", "--filter", "model", "--list"]) == 0
    assert len(capsys.readouterr().out.split()) == 12
    assert xllm(["conformance", "--backend", "cpu", "--filter", "model", "--size", "small", "--list"]) == 0
    assert capsys.readouterr().out.split() == [LLAMA_F32]
    assert "model" not in kinds()  # the CLI's registration ends with its run


# ---------------------------------------------------------------------------------- token rule


def _decode(tokens: list[int], logprobs: list[float], runner_up: list[tuple[int, float]]) -> Decode:
    top = [{t: lp, r: rlp} for t, lp, (r, rlp) in zip(tokens, logprobs, runner_up, strict=True)]
    return Decode(tokens, logprobs, top)


def _compare(got: Decode, want: Decode, dtype: torch.dtype) -> Checker:
    checker = Checker(threshold_for("model", dtype))
    compare_decodes([got], [want], dtype, len(want.tokens), checker)
    return checker


def test_near_tie_divergence_is_accepted_in_bfloat16_only() -> None:
    want = _decode([7, 8, 9], [-0.70, -0.70, -0.5], [(5, -0.72), (6, -0.71), (4, -3.0)])
    got = _decode([7, 6, 11], [-0.70, -0.70, -0.2], [(5, -0.72), (8, -0.71), (4, -3.0)])
    assert _compare(got, want, torch.bfloat16).ok  # took the runner-up, 0.01 nats below the best
    failures = _compare(got, want, torch.float32).failures
    assert any("token 6 != reference 8" in f for f in failures)


def test_divergence_at_a_clear_choice_fails() -> None:
    want = _decode([7, 8], [-0.1, -0.1], [(5, -3.0), (6, -2.5)])
    got = _decode([7, 6], [-0.1, -0.1], [(5, -3.0), (8, -2.5)])
    failures = _compare(got, want, torch.bfloat16).failures
    assert any(
        "token 6 != reference 8 where the reference's gap 2.4 >= near-tie tolerance" in f for f in failures
    )


def test_divergence_to_a_token_outside_the_reference_top_k_fails() -> None:
    want = _decode([7, 8], [-0.1, -0.70], [(5, -3.0), (6, -0.71)])
    got = _decode([7, 3], [-0.1, -0.70], [(5, -3.0), (8, -0.71)])
    assert any("not in the reference's top 2" in f for f in _compare(got, want, torch.bfloat16).failures)


def test_short_decode_fails() -> None:
    want = _decode([7, 8], [-0.1, -0.1], [(5, -3.0), (6, -2.5)])
    got = _decode([7], [-0.1], [(5, -3.0)])
    assert any("not 2" in f for f in _compare(got, want, torch.float32).failures)


# ---------------------------------------------------------------------------------- whole model


def test_cpu_float32_llama_decodes_like_transformers() -> None:
    report = run_model_cases(get_backend("cpu"), NumpyReference(), model_cases(LLAMA_F32))
    (result,) = report.results
    assert result.status == Status.PASS, result.detail
    assert result.nmse < 1e-9  # float32 vs float32: only summation order differs


def test_gptj_rope_fails_float32_llama() -> None:
    report = run_model_cases(GptjRope(), NumpyReference(), model_cases(LLAMA_F32))
    (result,) = report.results
    assert result.status == Status.FAIL
    assert "!= reference" in result.detail and "NMSE" in result.detail


@pytest.mark.slow
def test_cpu_passes_every_model_case_against_transformers() -> None:
    report = run_model_cases(get_backend("cpu"), NumpyReference(), model_cases())
    assert report.summary["pass"] == report.summary["total"] == 12, [
        (r.name, r.status.value, r.detail) for r in report.results if r.status != Status.PASS
    ]


@pytest.mark.slow
def test_cpu_passes_every_model_case_against_the_cpu_backend() -> None:
    report = run_model_cases(SecondCpu(), get_backend("cpu"), model_cases())
    bad = [(r.name, r.status.value, r.detail) for r in report.results if r.status != Status.PASS]
    assert not bad
    # The same kernels on both sides: identical decodes.
    assert all(r.nmse == 0.0 for r in report.results)


@pytest.mark.slow
@pytest.mark.parametrize("against", ["numpy", "cpu"])
def test_gptj_rope_fails_every_model_case(against) -> None:
    reference = NumpyReference() if against == "numpy" else get_backend("cpu")
    report = run_model_cases(GptjRope(), reference, model_cases())
    assert {r.status for r in report.results} == {Status.FAIL}, [
        (r.name, r.status.value, r.detail) for r in report.results if r.status != Status.FAIL
    ]


@pytest.mark.slow
@pytest.mark.parametrize("against", ["numpy", "cpu"])
def test_windowless_attention_fails_exactly_the_mistral_cases(against) -> None:
    # Only Mistral has a sliding window (32 tokens, shorter than the longest prompt).
    reference = NumpyReference() if against == "numpy" else get_backend("cpu")
    report = run_model_cases(WindowlessAttention(), reference, model_cases())
    failed = {r.name for r in report.results if r.status == Status.FAIL}
    assert failed == {r.name for r in report.results if "family=mistral" in r.name}, [
        (r.name, r.status.value, r.detail) for r in report.results
    ]
    assert all(r.status == Status.PASS for r in report.results if r.name not in failed)

"""`xllm bench serve`'s pure parts: SLO parsing, percentiles, metric computation, the report."""

from __future__ import annotations

import random

import pytest

from xllm.bench.serve import RequestResult, compute_metrics, format_report, parse_slo, random_prompt


def test_parse_slo() -> None:
    assert parse_slo("ttft_ms=500,tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert parse_slo(None) == {}
    with pytest.raises(ValueError):
        parse_slo("latency=3")
    with pytest.raises(ValueError):
        parse_slo("ttft_ms=-1")


def test_random_prompt_is_seeded() -> None:
    a = random_prompt(random.Random(1), 20)
    assert a == random_prompt(random.Random(1), 20) and len(a.split()) == 20


def test_compute_metrics() -> None:
    results = [
        RequestResult(True, 10, 5, ttft_s=0.1, latency_s=0.5, itl_s=[0.1, 0.1, 0.1, 0.1]),
        RequestResult(True, 10, 3, ttft_s=0.3, latency_s=0.7, itl_s=[0.2, 0.2]),
        RequestResult(False, error="boom"),
    ]
    m = compute_metrics(results, 2.0, {"ttft_ms": 200})
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 20 and m["total_output_tokens"] == 8
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["request_goodput"] == pytest.approx(0.5)  # only the first meets ttft <= 200 ms
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p99_ttft_ms"] == pytest.approx(298.0)
    assert m["mean_tpot_ms"] == pytest.approx((100.0 + 200.0) / 2)
    assert m["mean_itl_ms"] == pytest.approx(800.0 / 6)
    assert m["mean_e2el_ms"] == pytest.approx(600.0)
    report = format_report(m)
    for label in (
        "Successful requests:",
        "Failed requests:",
        "Request goodput",
        "Mean TTFT (ms):",
        "P90 ITL (ms):",
        "P99 E2EL (ms):",
    ):
        assert label in report


def test_compute_metrics_all_failed() -> None:
    m = compute_metrics([RequestResult(False)], 1.0, {})
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_random_prompt_sized_by_tokenizer(tiny_llama_dir, seed: int) -> None:
    from xllm.models import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)  # the real BPE tokenizer of the tiny checkpoint
    prompt = random_prompt(random.Random(seed), 20, tok)
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) == 20

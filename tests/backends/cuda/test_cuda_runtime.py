"""Identity, import safety and the runtime parts of the CUDA backend that work without a GPU.

`xllm backends` probes every backend on every machine, so importing the CUDA backend must not
import triton or cuda-python, and its probe must give a one-line reason instead of raising.
Interpret mode must switch Triton to its interpreter before the kernels are defined, and say so
when it is too late. Graphs, streams, events and memory queries fall back to host versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xllm.hal import BackendUnavailableError, GraphInput, NotSupportedError, get_backend

REPO = Path(__file__).resolve().parents[3]
NO_GPU = not torch.cuda.is_available()


def _python(code: str, interpret_env: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret_env:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_loads_neither_triton_nor_cuda_python():
    done = _python(
        "import sys, xllm.backends.cuda.backend as b\n"
        "print([m for m in ('triton', 'cuda', 'cuda.bindings') if m in sys.modules])\n"
        "print(b.CudaBackend.probe())\n"
        "print([m for m in ('triton',) if m in sys.modules])\n"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "[]"
    if NO_GPU:
        assert lines[1] in ("torch was built without CUDA", "no CUDA device visible")
        assert lines[2] == "[]"  # a failed probe never reached for triton


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU answer")
def test_unavailable_without_gpu():
    from xllm.backends.cuda.backend import CudaBackend

    reason = CudaBackend.probe()
    assert reason in ("torch was built without CUDA", "no CUDA device visible")
    assert "\n" not in reason
    assert CudaBackend.device_count() == 0
    with pytest.raises(BackendUnavailableError, match="cuda"):
        get_backend("cuda")


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU answer")
def test_xllm_backends_lists_cuda_unavailable_with_reason():
    done = subprocess.run(
        [sys.executable, "-m", "xllm", "backends", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    cuda = next(b for b in json.loads(done.stdout) if b["name"] == "cuda")
    assert cuda["available"] is False and cuda["device_count"] == 0
    assert cuda["reason"] in ("torch was built without CUDA", "no CUDA device visible")
    assert cuda["capabilities"]["graph_capture"] and cuda["capabilities"]["collective_backend"] == "nccl"


def test_interpret_probe_sets_the_environment_first():
    done = _python(
        "import os\n"
        "from xllm.backends.cuda.backend import CudaBackend\n"
        "print(CudaBackend.probe(interpret=True), os.environ.get('TRITON_INTERPRET'))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "1"]


def test_interpret_probe_refuses_kernels_compiled_for_the_gpu():
    done = _python(
        "import xllm.backends.cuda.kernels.attention\n"  # defined without TRITON_INTERPRET
        "from xllm.backends.cuda.backend import CudaBackend\n"
        "print(CudaBackend.probe(interpret=True))\n"
    )
    assert done.returncode == 0, done.stderr
    assert "imported before TRITON_INTERPRET=1 was set" in done.stdout


def test_interpret_probe_refuses_triton_imported_without_the_variable():
    """triton's own library (the combine functions of tl.sum) is decided at import: too late."""
    done = _python(
        "import triton\n"
        "from xllm.backends.cuda.backend import CudaBackend\n"
        "print(CudaBackend.probe(interpret=True))\n"
    )
    assert done.returncode == 0, done.stderr
    assert "imported before TRITON_INTERPRET=1 was set" in done.stdout


def test_unknown_option_is_a_reason_not_a_crash():
    from xllm.backends.cuda.backend import CudaBackend

    assert "unknown options" in CudaBackend.probe(interpreter=True)


def test_interpret_mode_identity(backend):
    assert backend.name == "cuda" and backend.device_type == "cuda"
    assert backend.device() == torch.device("cpu")
    caps = backend.capabilities
    assert caps.dtypes == (torch.float32, torch.bfloat16, torch.float16)
    assert not caps.graph_capture and not caps.virtual_memory and caps.collective_backend == "gloo"
    assert type(backend).CAPABILITIES.graph_capture and type(backend).CAPABILITIES.virtual_memory
    info = backend.mem_info()
    assert 0 < info.free_bytes <= info.total_bytes
    with pytest.raises(NotSupportedError):
        backend.create_xtensor(2)
    kv = backend.allocate_kv_cache(2, 3, 16, 2, 8, torch.bfloat16)
    assert len(kv) == 2 and kv[0][0].shape == (3, 16, 2, 8) and kv[0][0].device.type == "cpu"


def test_interpret_mode_streams_events_and_graph_runner(backend):
    stream = backend.create_stream()
    with stream:
        start, end = backend.create_event(enable_timing=True), backend.create_event(enable_timing=True)
        start.record()
        end.record(stream)
    stream.wait_event(end)
    end.synchronize()
    assert end.query() and start.elapsed_time_ms(end) >= 0.0
    backend.synchronize()

    weight = torch.randn(16)
    runner = backend.create_graph_runner(
        lambda x: backend.rms_norm(x, weight, 1e-6),
        {"x": GraphInput(torch.float32, (16,), 0.0)},
        capture_sizes=[2, 4],
    )
    runner.capture()
    x = torch.randn(3, 16)
    torch.testing.assert_close(runner.run(x=x), backend.rms_norm(x, weight, 1e-6))


@pytest.mark.skipif(not NO_GPU, reason="interpret mode is the no-GPU path")
def test_interpreted_conformance_suite_passes(tmp_path):
    """The CLI run the project documents: every small case passes against the CPU reference."""
    report = tmp_path / "r.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "xllm",
            "conformance",
            "--backend",
            "cuda",
            "--interpret",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    doc = json.loads(report.read_text())
    assert doc["summary"]["fail"] == 0 and doc["summary"]["error"] == 0
    assert doc["summary"]["pass"] >= 60
    skipped = {c["op"] for c in doc["cases"] if c["status"] == "SKIP"}
    assert skipped <= {"xtensor"}  # only what interpret mode honestly lacks


@pytest.mark.slow
@pytest.mark.skipif(not NO_GPU, reason="interpret mode is the no-GPU path")
def test_interpreted_conformance_suite_all_cases(backend, cpu):
    """Every conformance case (not just the small set), interpreted, against the CPU reference."""
    from xllm.hal.conformance import Status, build_cases, run_suite

    report = run_suite(backend, cpu, build_cases("all"))
    assert report.ok, [f"{r.name}: {r.detail}" for r in report.failed()]
    assert {r.op for r in report.results if r.status is Status.SKIP} <= {"xtensor"}

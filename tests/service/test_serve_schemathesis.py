"""Property-based API testing: schemathesis drives a real `xllm serve` from its own /openapi.json.

The only check is that no generated request gets a 5xx: every bad input must be a 4xx in
OpenAI's shape, never a crash. The server's context is short (64 tokens) so that generated
`max_tokens` values stay cheap on a CPU. The default run is bounded to well under a minute; the
`slow` run adds the coverage phase (boundary values of every field) and more examples.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serve_process import ServeProcess

pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def server(start_server) -> ServeProcess:
    return start_server("--max-model-len", "64", "--log-level", "warning")


def run_schemathesis(
    server: ServeProcess, tmp_path: Path, *args: str, timeout_s: float
) -> subprocess.CompletedProcess:
    exe = shutil.which("schemathesis") or shutil.which("st")
    cmd = [exe] if exe else [sys.executable, "-m", "schemathesis.cli"]
    cmd += [
        "run",
        f"{server.base_url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--seed",
        "1",
        "--request-timeout",
        "30",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=tmp_path)


def assert_no_server_errors(server: ServeProcess, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
    assert "Traceback" not in server.log_tail(100_000)
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_schemathesis_no_5xx(server: ServeProcess, tmp_path: Path) -> None:
    proc = run_schemathesis(
        server, tmp_path, "--phases", "examples,fuzzing", "--max-examples", "15", timeout_s=240
    )
    assert_no_server_errors(server, proc)


@pytest.mark.slow
def test_schemathesis_no_5xx_coverage_phase(server: ServeProcess, tmp_path: Path) -> None:
    proc = run_schemathesis(
        server, tmp_path, "--phases", "examples,coverage,fuzzing", "--max-examples", "100", timeout_s=1200
    )
    assert_no_server_errors(server, proc)

"""Property-based API testing: schemathesis drives a real `xllm serve` from its own /openapi.json.

Every check runs (`--checks all`) on positive and negative data (`--mode all`): schema-valid
requests must be served, schema-invalid ones refused with a 4xx, every status, content type
and body (event streams included) must be the ones the schema declares, an undeclared method
must get a 405 with `Allow`, and nothing may be a 5xx. So the published schema has to state
exactly what the server enforces. What no JSON Schema can state (rules between fields, the
context length in tokens) is in schemathesis_hooks.py.

The server's context is short (64 tokens) so that generated `max_tokens` values stay cheap on
a CPU. The default run is bounded to well under a minute; the `slow` runs add the coverage
phase (boundary values of every field, undeclared methods), more examples, and an API key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serve_process import ServeProcess

pytest.importorskip("schemathesis")

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
REQUEST_TIMEOUT_S = 30
API_KEY = "schemathesis-key"


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
        "all",
        "--mode",
        "all",
        "--seed",
        "1",
        "--request-timeout",
        str(REQUEST_TIMEOUT_S),
        # Speed is not what this checks: a generated batch (64 prompts, n=16) takes seconds on a CPU.
        "--max-response-time",
        str(REQUEST_TIMEOUT_S),
        # A free-text path parameter (/v1/models/{model_id}) has few negative values schemathesis
        # can send, so it filters many; that is about generation, not about the server.
        "--suppress-health-check",
        "filter_too_much",
        "--continue-on-failure",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
        *args,
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=tmp_path, env=env)


def assert_conforms(server: ServeProcess, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
    assert "Traceback" not in server.log_tail(100_000)
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_schemathesis_all_checks(server: ServeProcess, tmp_path: Path) -> None:
    proc = run_schemathesis(
        server, tmp_path, "--phases", "examples,fuzzing", "--max-examples", "20", timeout_s=240
    )
    assert_conforms(server, proc)


@pytest.mark.slow
def test_schemathesis_all_checks_coverage_phase(server: ServeProcess, tmp_path: Path) -> None:
    proc = run_schemathesis(
        server, tmp_path, "--phases", "examples,coverage,fuzzing", "--max-examples", "100", timeout_s=1800
    )
    assert_conforms(server, proc)


@pytest.mark.slow
def test_schemathesis_all_checks_with_api_key(start_server, tmp_path: Path) -> None:
    # /v1/* then declare bearer auth: `ignored_auth` checks that a request without it gets a 401.
    server = start_server("--max-model-len", "64", "--log-level", "warning", "--api-key", API_KEY)
    proc = run_schemathesis(
        server,
        tmp_path,
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "25",
        timeout_s=1800,
    )
    assert_conforms(server, proc)

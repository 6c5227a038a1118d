"""A real `xllm serve` subprocess for the e2e tests, and the OpenAI error-shape assertion.

`ServeProcess` starts `python -m xllm serve` on a free loopback port, records what /health said
while the model loaded, and stops the server (SIGTERM, then SIGKILL if it hangs). It lives in a
plain module rather than conftest.py so test modules can import it unambiguously.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """One `xllm serve` subprocess on 127.0.0.1."""

    def __init__(
        self, model_dir: Path, *extra_args: str, log_path: Path, launcher: Sequence[str] = ("-m", "xllm")
    ) -> None:
        """`launcher`: what runs the CLI, after the interpreter (a test script may wrap it)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.health_log: list[tuple[int, dict]] = []  # (status, body) seen while waiting for ready
        cmd = [
            sys.executable,
            *launcher,
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            *extra_args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=2.0)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            self.health_log.append((r.status_code, r.json()))
            if r.status_code == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"xllm serve not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n_chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n_chars:].decode(errors="replace")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int:
        self.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    """The response has `status` and OpenAI's error JSON shape; returns the inner error object."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]

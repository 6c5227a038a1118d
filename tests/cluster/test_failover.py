"""Failover end to end: `kill -9` of the instance serving a stream, mid-stream.

Three real `xllm serve` processes register themselves (leases, loads) in the router's embedded
registry. They run through the fault launcher's "slow" mode (10 ms more per attention call) so
that a stream is still going when the test kills its instance; everything else is `xllm serve`.
The client's stream must go on from another instance with no duplicate and no missing token, end
with the uninterrupted greedy text, and the router must show the killed instance dead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from router_helpers import RouterServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from serve_process import ServeProcess  # noqa: E402

from xllm.cluster.embedded_registry import EmbeddedRegistry  # noqa: E402
from xllm.cluster.router import INSTANCE_HEADER  # noqa: E402

LAUNCHER = Path(__file__).resolve().parents[1] / "service" / "fault_launcher.py"
MAX_TOKENS = 96
KILL_AFTER_CHUNKS = 8


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    router = RouterServer(EmbeddedRegistry(), "round_robin")
    marker = tmp_path_factory.mktemp("slow") / "on"
    marker.touch()
    instances: dict[str, ServeProcess] = {}
    try:
        for name in ("a", "b", "c"):
            instances[name] = ServeProcess(
                tiny_llama_dir,
                "--registry",
                router.url,
                "--instance-id",
                name,
                "--served-model-name",
                "tiny",
                "--dtype",
                "float32",
                log_path=tmp_path_factory.mktemp(f"log-{name}") / "serve.log",
                launcher=(str(LAUNCHER), str(marker), "slow"),
            )
        for server in instances.values():
            server.wait_ready()
        deadline = time.monotonic() + 30
        while sum(i["status"] == "up" for i in cluster_instances(router.url)) < 3:
            assert time.monotonic() < deadline, cluster_instances(router.url)
            time.sleep(0.1)
        yield router, instances
    finally:
        for server in instances.values():
            server.stop()
        router.stop()


def cluster_instances(url: str) -> list[dict]:
    return httpx.get(f"{url}/cluster/instances", timeout=5).json()


def stream(
    url: str, path: str, body: dict, kill: dict[str, ServeProcess] | None = None
) -> tuple[str, str, list]:
    """Streams `body`; with `kill`, SIGKILLs the serving instance after a few chunks. Returns the
    text, the instance that started serving it and every event."""
    events: list = []
    with httpx.stream("POST", f"{url}{path}", json=body | {"stream": True}, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        served_by = resp.headers[INSTANCE_HEADER]
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
            if kill is not None and len(events) == KILL_AFTER_CHUNKS:
                os.kill(kill[served_by].proc.pid, signal.SIGKILL)
    assert events[-1] == "[DONE]", events[-3:]
    assert not any("error" in e for e in events[:-1] if isinstance(e, dict)), events
    text = "".join(
        c["text"] if "text" in c else c["delta"].get("content", "") for e in events[:-1] for c in e["choices"]
    )
    return text, served_by, events


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Once upon a time, in a land far away,"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a long story."}]}),
    ],
    ids=["completions", "chat"],
)
def test_kill_9_mid_stream_continues_the_stream_elsewhere(cluster, path: str, body: dict) -> None:
    router, instances = cluster
    body = body | {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    usage = {"stream_options": {"include_usage": True}}
    whole, _, _ = stream(router.url, path, body)
    text, victim, events = stream(router.url, path, body | usage, kill=instances)
    assert instances[victim].proc.wait(5) == -signal.SIGKILL
    assert text == whole  # nothing missing, nothing twice
    assert len({e["id"] for e in events[:-1]}) == 1  # one stream, one id
    assert events[-2]["usage"]["completion_tokens"] == MAX_TOKENS
    if "chat" in path:
        assert sum(c["delta"].get("role") == "assistant" for e in events[:-1] for c in e["choices"]) == 1
    assert all("token_ids" not in c for e in events[:-1] for c in e["choices"])  # not asked for
    statuses = {i["id"]: i["status"] for i in cluster_instances(router.url)}
    assert statuses.get(victim, "dead") == "dead"  # dead at once (and gone once its lease expires)
    metrics = httpx.get(f"{router.url}/metrics").text
    assert f'xllm:router_streams_resumed_total{{instance="{victim}"}} 1.0' in metrics
    # Later requests avoid the dead instance.
    again, served_by, _ = stream(router.url, path, body)
    assert again == whole and served_by != victim

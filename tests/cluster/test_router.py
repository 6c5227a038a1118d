"""The router end to end: two real `xllm serve` instances on the tiny checkpoint behind it.

The instances are registered into an in-memory `Registry` by the test itself (as `xllm serve`
would through its registration), with a publisher thread refreshing each live instance's load.
Each router is a real uvicorn server in a thread, so streams are relayed over real sockets.
Tests run in file order; the last one kills the instances.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from router_helpers import MemoryRegistry, RouterServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from serve_process import ServeProcess, assert_openai_error, free_port  # noqa: E402

from xllm.cluster.policies import prompt_block_digests  # noqa: E402
from xllm.cluster.registry import InstanceInfo, InstanceLoad, Role  # noqa: E402
from xllm.cluster.router import INSTANCE_HEADER  # noqa: E402

BLOCK_SIZE = 16  # `xllm serve`'s default


def new_registry():
    """The embedded registry when it is there (leases expire for real), else `MemoryRegistry`."""
    try:
        from xllm.cluster.embedded_registry import EmbeddedRegistry
    except ModuleNotFoundError:
        return MemoryRegistry()
    return EmbeddedRegistry()


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    registry = new_registry()
    servers = {
        name: ServeProcess(tiny_llama_dir, log_path=tmp_path_factory.mktemp(f"log-{name}") / "serve.log")
        for name in ("a", "b")
    }
    cached: dict[str, list[str]] = {"a": [], "b": []}  # what each instance "publishes" as its cache
    infos: dict[str, InstanceInfo] = {}
    stop = threading.Event()
    try:
        for name, server in servers.items():
            server.wait_ready()
            infos[name] = InstanceInfo(
                name,
                Role.MIXED,
                server.base_url,
                str(tiny_llama_dir),
                "cpu",
                256,
                BLOCK_SIZE,
                server.proc.pid,
            )
        leases: dict[str, int] = {}

        def publish() -> None:
            # What an instance's registration does: register under a lease, keep it alive and
            # refresh the load; a killed instance stops doing either.
            while not stop.is_set():
                for name, server in servers.items():
                    if server.proc.poll() is not None:
                        continue
                    if isinstance(registry, MemoryRegistry):
                        asyncio.run(registry.register(infos[name]))
                    elif name not in leases or not registry.refresh(leases[name]):
                        leases[name] = registry.grant(infos[name], ttl_s=5.0)
                    load = InstanceLoad(cached_blocks=list(cached[name]), updated_at=time.time())
                    asyncio.run(registry.publish_load(name, load))
                stop.wait(0.3)

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        time.sleep(0.5)
        yield registry, servers, cached
    finally:
        stop.set()
        for server in servers.values():
            server.stop()


@pytest.fixture
def router(cluster):
    registry = cluster[0]
    started: list[RouterServer] = []

    def start(policy: str = "round_robin", **kwargs) -> RouterServer:
        r = RouterServer(registry, policy, **kwargs)
        started.append(r)
        time.sleep(0.2)  # one poll of the registry
        return r

    yield start
    for r in started:
        r.stop()


def completion(url: str, prompt: str = "Hello, my name is", **extra) -> httpx.Response:
    body = {"model": None, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def stream_events(url: str, prompt: str) -> tuple[str, list[str], str]:
    """(instance, data payloads, concatenated text) of a streamed completion through `url`."""
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
        instance = r.headers[INSTANCE_HEADER]
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]")
    return instance, events, text


def test_instances_listed_up(cluster, router):
    r = router()
    listed = httpx.get(f"{r.url}/cluster/instances").json()
    assert [(i["id"], i["status"], i["role"]) for i in listed] == [("a", "up", "mixed"), ("b", "up", "mixed")]
    assert {i["url"] for i in listed} == {s.base_url for s in cluster[1].values()}
    assert set(listed[0]) >= {"num_requests_running", "num_requests_waiting", "kv_cache_usage", "pid"}
    assert httpx.get(f"{r.url}/health").status_code == 200
    models = httpx.get(f"{r.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [listed[0]["model"]]
    assert listed[0]["pid"] == cluster[1]["a"].proc.pid
    if not isinstance(cluster[0], MemoryRegistry):  # the embedded registry's API is mounted
        members = httpx.get(f"{r.url}/cluster/registry/members").json()["members"]
        assert sorted(m["info"]["id"] for m in members) == ["a", "b"]


def test_greedy_answers_equal_the_instances_own(cluster, router):
    r = router()
    servers = cluster[1]
    direct = completion(servers["a"].base_url).json()["choices"][0]["text"]
    seen = set()
    for _ in range(2):  # round robin: one per instance
        resp = completion(r.url)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == direct
        seen.add(resp.headers[INSTANCE_HEADER])
    assert seen == {"a", "b"}
    chat = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 6, "temperature": 0}
    own = httpx.post(f"{servers['b'].base_url}/v1/chat/completions", json=chat, timeout=60).json()
    routed = httpx.post(f"{r.url}/v1/chat/completions", json=chat, timeout=60)
    assert routed.status_code == 200
    assert routed.json()["choices"][0]["message"] == own["choices"][0]["message"]


def test_bad_requests_get_openai_errors(router):
    r = router()
    assert_openai_error(httpx.post(f"{r.url}/v1/completions", json={"prompt": "x", "max_tokens": -1}), 400)
    # Validated by the instance and passed through with its status and body.
    err = assert_openai_error(completion(r.url, model="no-such-model"), 404)
    assert "no-such-model" in err["message"]


def test_anthropic_messages_and_model_lookup_are_routed(cluster, router):
    r = router()
    servers = cluster[1]
    model = httpx.get(f"{r.url}/v1/models").json()["data"][0]["id"]
    assert httpx.get(f"{r.url}/v1/models/{model}").json()["id"] == model
    assert_openai_error(httpx.get(f"{r.url}/v1/models/no-such-model"), 404)
    body = {
        "model": model,
        "max_tokens": 6,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    own = httpx.post(f"{servers['a'].base_url}/v1/messages", json=body, timeout=60).json()
    routed = httpx.post(f"{r.url}/v1/messages", json=body, timeout=60)
    assert routed.status_code == 200 and routed.json()["content"] == own["content"]
    with httpx.stream("POST", f"{r.url}/v1/messages", json=body | {"stream": True}, timeout=60) as resp:
        lines = list(resp.iter_lines())
    assert "event: message_start" in lines and "event: message_stop" in lines  # event names kept
    text = "".join(
        json.loads(line[6:])["delta"]["text"]
        for line in lines
        if line.startswith("data: ") and '"text_delta"' in line
    )
    assert text == own["content"][0]["text"]
    bad = httpx.post(f"{r.url}/v1/messages", json=body | {"max_tokens": 0}, timeout=60)
    assert bad.status_code == 400 and bad.json()["type"] == "error"  # Anthropic's error shape


def test_streaming_passes_through_chunk_by_chunk(cluster, router):
    r = router()
    direct = completion(cluster[1]["a"].base_url, prompt="Once upon a time").json()["choices"][0]["text"]
    _, events, text = stream_events(r.url, "Once upon a time")
    assert events[-1] == "[DONE]" and len(events) > 2
    assert text == direct


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded"])
def test_sixteen_concurrent_streams_use_both_instances(router, policy):
    r = router(policy)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: stream_events(r.url, f"Request number {i} says"), range(16)))
    assert all(events[-1] == "[DONE]" for _, events, _ in results)
    assert {instance for instance, _, _ in results} == {"a", "b"}
    metrics = httpx.get(f"{r.url}/metrics").text
    if policy == "round_robin":
        assert 'xllm:router_requests_routed_total{instance="a"} 8.0' in metrics
    assert r.state.placed == {"a": 0, "b": 0}  # every relayed response was accounted for
    assert 'xllm:instance_num_requests_running{instance="b",role="mixed",status="up"}' in metrics


def test_cache_aware_places_on_the_instance_holding_the_prefix(cluster, tiny_llama_dir, router):
    from transformers import AutoTokenizer

    from xllm.service.serving import chat_prompt_text

    _, _, cached = cluster
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = "The quick brown fox jumps over the lazy dog, " * 6
    ids = tokenizer(prompt)["input_ids"]
    messages = [{"role": "user", "content": prompt}]
    chat_ids = tokenizer(chat_prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    assert min(len(ids), len(chat_ids)) >= 2 * BLOCK_SIZE
    explicit = router("cache_aware", tokenizer_path=str(tiny_llama_dir))
    default = router("cache_aware")  # the tokenizer of the first member's model directory
    deadline = time.monotonic() + 30
    while default.state.tokenizer is None:
        assert time.monotonic() < deadline, "the default tokenizer did not load"
        time.sleep(0.1)
    chat = {"messages": messages, "max_tokens": 2, "temperature": 0}
    try:
        for holder in ("b", "a"):
            cached[holder] = prompt_block_digests(ids, BLOCK_SIZE, None)
            time.sleep(1.0)  # published, then polled
            for r in (explicit, default):
                assert completion(r.url, prompt=prompt).headers[INSTANCE_HEADER] == holder
            # Salted requests name other blocks: no hit, load decides (both idle: "a" by id).
            assert completion(explicit.url, prompt=prompt, cache_salt="s").headers[INSTANCE_HEADER] == "a"
            cached[holder] = prompt_block_digests(chat_ids, BLOCK_SIZE, None)
            time.sleep(1.0)
            resp = httpx.post(f"{default.url}/v1/chat/completions", json=chat, timeout=60)
            assert resp.status_code == 200 and resp.headers[INSTANCE_HEADER] == holder
            cached[holder] = []
    finally:
        cached["a"], cached["b"] = [], []


def test_drain_sends_new_requests_to_the_other(router):
    r = router()
    assert httpx.post(f"{r.url}/cluster/instances/a/drain").json() == {"id": "a", "status": "draining"}
    assert_openai_error(httpx.post(f"{r.url}/cluster/instances/zz/drain"), 404)
    statuses = {i["id"]: i["status"] for i in httpx.get(f"{r.url}/cluster/instances").json()}
    assert statuses == {"a": "draining", "b": "up"}
    for _ in range(4):
        resp = completion(r.url)
        assert resp.status_code == 200 and resp.headers[INSTANCE_HEADER] == "b"


def test_streams_arrive_in_pieces(router):
    r = router()
    body = {"prompt": "Once", "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{r.url}/v1/completions", json=body, timeout=60) as resp:
        pieces = [chunk for chunk in resp.iter_raw() if chunk]
    # Relayed as the instance sends them, not gathered into one body.
    assert len(pieces) > 2
    assert b"".join(pieces).endswith(b"data: [DONE]\n\n")


def test_router_command_with_embedded_registry_drains_on_sigterm(cluster, tmp_path):
    pytest.importorskip("xllm.cluster.embedded_registry")
    _, servers, _ = cluster
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "router.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "xllm", "router", "--port", str(port), "--policy", "least_loaded"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "router.log").read_text()
            try:
                if httpx.get(f"{url}/cluster/instances").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert_openai_error(httpx.get(f"{url}/health"), 503)  # nobody registered yet
        info = InstanceInfo("a", Role.MIXED, servers["a"].base_url, "m", "cpu", 256, BLOCK_SIZE).to_json()
        assert (
            httpx.post(f"{url}/cluster/registry/register", json={"info": info, "ttl_s": 30}).status_code
            == 200
        )
        load = InstanceLoad(updated_at=time.time()).to_json()
        assert httpx.put(f"{url}/cluster/registry/load/a", json=load).status_code == 200
        time.sleep(1.0)
        resp = completion(url)
        assert resp.status_code == 200 and resp.headers[INSTANCE_HEADER] == "a", resp.text
        # SIGTERM while a stream is in flight: the stream still ends properly, then the router exits 0.
        body = {"prompt": "Once", "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def test_bench_serve_cluster_workloads_report_their_figures(cluster, router, tmp_path, tiny_llama_dir):
    """`xllm bench serve --workload shared-prefix|mixed` through the router: the report's numbers
    come from real responses (prefix hits from usage.prompt_tokens_details)."""
    from xllm.cli.main import main as cli_main

    r = router("cache_aware", tokenizer_path=str(tiny_llama_dir))
    common = ["bench", "serve", "--base-url", r.url, "--no-progress", "--output-len", "2"]
    prefix_json = tmp_path / "prefix.json"
    assert (
        cli_main(
            [
                *common,
                "--workload",
                "shared-prefix",
                "--compare-policies",
                "cache_aware,round_robin",
                "--num-prompts",
                "8",
                "--prefix-groups",
                "2",
                "--prefix-len",
                "48",
                "--input-len",
                "4",
                "--max-concurrency",
                "2",
                "--tokenizer",
                str(tiny_llama_dir),
                "--json",
                str(prefix_json),
            ]
        )
        == 0
    )
    runs = json.loads(prefix_json.read_text())["runs"]
    assert [run["run"] for run in runs] == ["cache_aware", "round_robin"]
    assert all(run["completed"] == 8 for run in runs)
    assert runs[0]["prefix_hit_rate"] > 0.3  # 6 of 8 prompts reuse a 48-token prefix
    assert httpx.get(f"{r.url}/cluster/policy").json() == {"policy": "round_robin"}
    mixed_json = tmp_path / "mixed.json"
    args = ["--workload", "mixed", "--num-prompts", "3", "--request-rate", "20", "--input-len", "8"]
    args += ["--offline-concurrency", "2", "--offline-output-len", "4", "--json", str(mixed_json)]
    assert cli_main([*common, *args]) == 0
    mixed = json.loads(mixed_json.read_text())["runs"]
    assert [run["run"] for run in mixed] == [
        "online alone",
        "online + offline (priority 1)",
        "online + offline (priority 0)",
    ]
    assert all(run["completed"] == 3 and run["p99_ttft_ms"] > 0 for run in mixed)
    assert mixed[0]["offline_completed"] == 0
    assert mixed[1]["offline_completed"] > 0 and mixed[2]["offline_completed"] > 0  # the flood ran beside


def test_killed_instances_are_skipped_then_503(cluster, router):
    _, servers, _ = cluster
    r = router()
    servers["a"].proc.kill()
    servers["a"].proc.wait(10)
    # The registry still lists "a" as up: a connection refused re-dispatches to "b".
    for _ in range(4):
        resp = completion(r.url)
        assert resp.status_code == 200, resp.text
        assert resp.headers[INSTANCE_HEADER] == "b"
    metrics = httpx.get(f"{r.url}/metrics").text
    assert 'xllm:router_requests_redispatched_total{instance="a"} 1.0' in metrics
    statuses = {i["id"]: i["status"] for i in httpx.get(f"{r.url}/cluster/instances").json()}
    assert statuses == {"a": "dead", "b": "up"}
    servers["b"].proc.kill()
    servers["b"].proc.wait(10)
    err = assert_openai_error(completion(r.url), 503)
    assert err["code"] == "no_instance"
    assert httpx.get(f"{r.url}/health").status_code == 503

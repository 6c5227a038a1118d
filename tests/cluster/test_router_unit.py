"""The router against fake instances (tiny FastAPI apps): re-dispatch, error pass-through,
staleness, drain and metrics, without loading a model."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from router_helpers import AppServer, MemoryRegistry, RouterServer, free_port

from xllm.cluster.policies import STALE_LOAD_S
from xllm.cluster.registry import InstanceInfo, InstanceLoad, Member, Role
from xllm.cluster.router import INSTANCE_HEADER


def fake_instance(
    name: str, status: int = 200, break_stream: bool = False, seen: list | None = None
) -> FastAPI:
    """Answers JSON with its name; a stream is two chunks of text with their token ids (the second
    one never comes when it `break_stream`s). Bodies it receives go to `seen`."""
    app = FastAPI()

    def chunk(text: str, ids: list[int]) -> bytes:
        event = {"id": f"cmpl-{name}", "created": len(name), "who": name}
        event["choices"] = [{"index": 0, "text": text, "token_ids": ids}]
        return f"data: {json.dumps(event)}\n\n".encode()

    @app.post("/v1/completions")
    async def completions(body: dict, request: Request) -> object:
        if seen is not None:
            seen.append(body | {"x-priority": request.headers.get("x-priority")})
        if status != 200:
            error = {"message": f"{name} is draining", "type": "x", "param": None, "code": "draining"}
            return JSONResponse({"error": error}, status_code=status, headers={"Retry-After": "5"})
        if (body.get("kv_transfer_params") or {}).get("do_remote_decode"):  # a PD prefill part
            choice = {"index": 0, "text": "Hel", "token_ids": [1], "finish_reason": "length"}
            answer = {"id": f"cmpl-{name}", "created": 1, "model": "m", "choices": [choice]}
            return JSONResponse(answer | {"kv_transfer_params": {"transfer_id": "t1"}})
        if body.get("stream"):

            async def events():
                if "resume" not in body:  # a resumed stream sends only what follows
                    yield chunk("Hel", [1, 2])
                await asyncio.sleep(0.05)
                if break_stream:
                    raise RuntimeError("instance crashed mid-stream")
                yield chunk("lo", [3])
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"who": name, "echo": body}, status_code=201)

    return app


@pytest.fixture
def setup():
    registry = MemoryRegistry()
    servers: list[AppServer] = []

    def add(name: str, url: str | None = None, age_s: float = 0.0, role: Role = Role.MIXED, **kwargs) -> None:
        if url is None:
            server = AppServer(fake_instance(name, **kwargs))
            servers.append(server)
            url = server.url
        info = InstanceInfo(name, role, url, "m", "cpu", 8, 16)
        asyncio.run(registry.register(info))
        asyncio.run(registry.publish_load(name, InstanceLoad(updated_at=time.time() - age_s)))

    def router(policy: str = "round_robin") -> RouterServer:
        r = RouterServer(registry, policy)
        servers.append(r)
        return r

    yield add, router
    for s in servers:
        s.stop()


def post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body}, timeout=10)


def test_json_is_relayed_as_is_with_its_status(setup):
    add, router = setup
    add("a")
    r = router()
    resp = post(r.url, seed=7)
    assert resp.status_code == 201
    assert resp.json() == {"who": "a", "echo": {"prompt": "hi", "max_tokens": 2, "seed": 7}}
    assert resp.headers[INSTANCE_HEADER] == "a"


def test_bad_request_is_refused_by_the_router_itself(setup):
    _, router = setup
    r = router()  # no instance at all: validation comes first
    resp = httpx.post(f"{r.url}/v1/completions", json={"prompt": "hi", "temperature": "hot"})
    assert resp.status_code == 400
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert resp.json()["error"]["param"] == "temperature"


def test_unreachable_and_unavailable_instances_are_replaced(setup):
    add, router = setup
    add("a", url=f"http://127.0.0.1:{free_port()}")  # nobody listens there
    add("b", status=503)
    add("c")
    r = router()
    for _ in range(3):
        resp = post(r.url)
        assert resp.status_code == 201 and resp.json()["who"] == "c"
    metrics = httpx.get(f"{r.url}/metrics").text
    assert 'xllm:router_requests_redispatched_total{instance="a"} 1.0' in metrics
    assert 'xllm:router_requests_redispatched_total{instance="b"}' in metrics
    assert 'xllm:router_requests_routed_total{instance="c"} 3.0' in metrics
    statuses = {i["id"]: i["status"] for i in httpx.get(f"{r.url}/cluster/instances").json()}
    assert statuses == {"a": "dead", "b": "up", "c": "up"}  # a failed connection marks it dead


def test_every_instance_unavailable_passes_the_last_503_on(setup):
    add, router = setup
    add("a", status=503)
    r = router()
    resp = post(r.url)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
    assert resp.json()["error"]["message"] == "a is draining"


def test_no_instance_left_is_a_503_openai_error(setup):
    add, router = setup
    add("stale", age_s=STALE_LOAD_S + 5)
    r = router()
    assert httpx.get(f"{r.url}/cluster/instances").json()[0]["status"] == "dead"
    resp = post(r.url)
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_instance"
    assert httpx.get(f"{r.url}/health").status_code == 503


def stream_events(url: str, **body) -> list[dict | str]:
    payload = {"prompt": "hi", "stream": True, **body}
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=10) as resp:
        assert resp.status_code == 200
        lines = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def wait_for_metric(url: str, line: str) -> None:
    deadline = time.monotonic() + 5
    while line not in (metrics := httpx.get(f"{url}/metrics").text):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)


def test_a_broken_stream_with_nowhere_to_resume_ends_with_an_error_event(setup):
    add, router = setup
    add("a", break_stream=True)
    r = router()
    events = stream_events(r.url)
    assert events[0]["choices"][0]["text"] == "Hel"
    assert "token_ids" not in events[0]["choices"][0]  # the router asked for them, the client did not
    assert (
        events[1]["error"]["code"] == "instance_failed"
        and "instance a" in events[1]["error"]["message"].lower()
    )
    assert events[2] == "[DONE]"
    wait_for_metric(r.url, 'xllm:router_requests_failed_total{reason="broken_stream"} 1.0')
    assert r.state.placed == {"a": 0}


def test_a_broken_stream_resumes_on_another_instance_after_what_was_sent(setup):
    add, router = setup
    seen_a: list[dict] = []
    seen_b: list[dict] = []
    add("a", break_stream=True, seen=seen_a)
    add("b", seen=seen_b)
    r = router("round_robin")
    r.state.turn = iter([0, 1])  # a first, then b  # type: ignore[assignment]
    events = stream_events(r.url, return_token_ids=True, max_tokens=5)
    texts = [e["choices"][0]["text"] for e in events if isinstance(e, dict)]
    assert texts == ["Hel", "lo"] and events[-1] == "[DONE]"
    assert [e["id"] for e in events[:-1]] == ["cmpl-a", "cmpl-a"]  # one stream's id throughout
    assert [e["choices"][0]["token_ids"] for e in events[:-1]] == [[1, 2], [3]]  # asked for: kept
    assert seen_a[0]["return_token_ids"] is True and "resume" not in seen_a[0]
    assert seen_b[0]["resume"] == {"token_ids": [1, 2], "text_offset": 3}
    assert seen_b[0]["max_tokens"] == 5 and seen_b[0]["prompt"] == "hi" and seen_b[0]["x-priority"] is None
    wait_for_metric(r.url, 'xllm:router_streams_resumed_total{instance="a"} 1.0')
    statuses = {i["id"]: i["status"] for i in httpx.get(f"{r.url}/cluster/instances").json()}
    assert statuses["a"] == "dead"
    assert r.state.placed == {"a": 0, "b": 0}


def test_a_stream_that_cannot_be_resumed_is_not_resumed(setup):
    add, router = setup
    seen_b: list[dict] = []
    add("a", break_stream=True)
    add("b", seen=seen_b)
    r = router("round_robin")
    r.state.turn = iter([0, 1])  # type: ignore[assignment]
    events = stream_events(r.url, n=2)
    assert events[-2]["error"]["code"] == "instance_failed" and events[-1] == "[DONE]"
    assert seen_b == [] and "return_token_ids" not in str(events)


def test_drain_and_instance_gauges(setup):
    add, router = setup
    add("a")
    add("b")
    r = router("least_loaded")
    assert httpx.post(f"{r.url}/cluster/instances/a/drain").status_code == 200
    assert all(post(r.url).json()["who"] == "b" for _ in range(3))
    metrics = httpx.get(f"{r.url}/metrics").text
    assert 'xllm:instance_num_requests_running{instance="a",role="mixed",status="draining"} 0.0' in metrics
    assert 'xllm:instance_kv_cache_usage_perc{instance="b",role="mixed",status="up"} 0.0' in metrics
    resp = httpx.post(f"{r.url}/cluster/instances/nope/drain")
    assert resp.status_code == 404 and "nope" in resp.json()["error"]["message"]


def test_offline_requests_fill_idle_capacity_and_do_not_repel_online_ones():
    from xllm.cluster.router import RouterState

    state = RouterState(MemoryRegistry(), "least_loaded")
    now = time.time()
    state.members = [
        Member(
            InstanceInfo(name, Role.MIXED, f"http://{name}", "m", "cpu", 8, 16), InstanceLoad(updated_at=now)
        )
        for name in ("a", "b")
    ]

    def pick(offline: bool) -> str:
        member = state.choose(state.candidates("m", set(), offline), None, None, offline)
        state.place(member.info.id, 1, offline)
        return member.info.id

    # A burst of offline work spreads over the idle instances...
    assert [pick(offline=True) for _ in range(6)] == ["a", "b", "a", "b", "a", "b"]
    # ...and online requests still see both as idle: the instances preempt offline work for them.
    online = state.candidates("m", set(), offline=False)
    assert [m.load.num_requests_running + m.load.num_requests_waiting for m in online] == [0, 0]
    assert pick(offline=False) == "a" and pick(offline=False) == "b"
    # Offline placement counts everything: the next offline request goes where there is most room.
    state.place("a", 2, offline=False)
    assert pick(offline=True) == "b"
    assert state.placed == {"a": 6, "b": 5} and state.placed_offline == {"a": 3, "b": 4}


def test_priority_header_reaches_the_instance(setup):
    add, router = setup
    seen: list[dict] = []
    add("a", seen=seen)
    r = router()
    resp = httpx.post(
        f"{r.url}/v1/completions",
        json={"prompt": "hi", "max_tokens": 2},
        headers={"X-Priority": "1"},
        timeout=10,
    )
    assert resp.status_code == 201 and seen[0]["x-priority"] == "1"
    bad = httpx.post(
        f"{r.url}/v1/completions", json={"prompt": "hi"}, headers={"X-Priority": "high"}, timeout=10
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"


def test_a_pd_split_whose_decode_part_finds_no_instance_is_served_whole_without_a_repeat(setup):
    add, router = setup
    seen_p: list[dict] = []
    add("p", role=Role.PREFILL, seen=seen_p)
    add("d", role=Role.DECODE, status=503)  # e.g. being switched to prefill: refuses the decode part
    r = router("round_robin")
    events = stream_events(r.url, return_token_ids=True, max_tokens=5)
    # The prefill instance answered its part, then served the request whole: the client's stream
    # is that whole stream, the first token once.
    assert [e["choices"][0]["token_ids"] for e in events[:-1]] == [[1, 2], [3]] and events[-1] == "[DONE]"
    assert seen_p[0]["kv_transfer_params"] == {"do_remote_decode": True}
    assert "resume" not in seen_p[1] and "kv_transfer_params" not in seen_p[1]
    wait_for_metric(r.url, "xllm:router_pd_fallbacks_total 1.0")

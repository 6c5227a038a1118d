"""The HTTP layer against a fake engine, in process: schemas, OpenAI error JSON, SSE, draining.

These run without a model (fast, no subprocess); tests/service/test_server_e2e.py repeats the
user-visible checks against a real `xllm serve` process with the real engine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fake_async_llm import FakeAsyncLLM, FakeSamplingParams

from xllm.service import engine_client
from xllm.service.app import Phase, ServerConfig, ServerState, create_app
from xllm.service.serving import sse


@pytest.fixture(autouse=True)
def fake_sampling_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_client, "sampling_params_class", lambda: FakeSamplingParams)
    engine_client.sampling_param_names.cache_clear()
    yield
    engine_client.sampling_param_names.cache_clear()


async def _wait_ready(state: ServerState) -> None:
    for _ in range(200):
        if state.phase is not Phase.LOADING:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("fake engine never became ready")


async def make_client(
    engine: FakeAsyncLLM | None = None, **config: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, ServerState]]:
    engine = engine or FakeAsyncLLM()
    state = ServerState(ServerConfig(**config))
    app = create_app(state.config, engine_factory=lambda: engine, state=state)
    async with app.router.lifespan_context(app):
        await _wait_ready(state)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, state


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async for c, _ in make_client():
        yield c


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def parse_sse(text: str) -> list[Any]:
    events = [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_sse_format() -> None:
    assert sse({"a": 1}) == 'data: {"a":1}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"


async def test_health_models_version(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert "version" in (await client.get("/version")).json()
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
    assert (await client.get("/v1/models/fake-model")).json()["id"] == "fake-model"
    assert_openai_error(await client.get("/v1/models/other"), 404)


async def test_completion_and_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 5})
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "abcde"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


async def test_completion_batch_prompts_n_echo_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"prompt": ["x", "yz"], "max_tokens": 2, "n": 2, "echo": True, "logprobs": 1}
    )
    body = r.json()
    assert r.status_code == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"] == "xab"
    assert body["choices"][1]["text"] == "xbc"
    assert body["choices"][2]["text"] == "yzab"
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"][-2:] == ["a", "b"] and lp["token_logprobs"][-1] == -0.5
    assert lp["token_logprobs"][0] is None  # the first prompt token has no logprob


async def test_completion_token_prompts(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": [[1, 70], [1, 71, 72]], "max_tokens": 1})
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 5


async def test_completion_stream(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={"prompt": "hi", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "abcd"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_chat_and_stream(client: httpx.AsyncClient) -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "hey"}]},
    ]
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": msgs, "max_completion_tokens": 3, "logprobs": True, "top_logprobs": 2},
    )
    body = r.json()
    assert r.status_code == 200, body
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0]["token"] == "a" and len(content[0]["top_logprobs"]) == 2
    r = await client.post(
        "/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "stream": True, "n": 2}
    )
    chunks = parse_sse(r.text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    for i in (0, 1):
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == i
        )
        assert text == ("abc" if i == 0 else "bcd")


async def test_stop_sequence(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "stop": "d"})
    assert r.json()["choices"][0] == {"index": 0, "text": "abc", "logprobs": None, "finish_reason": "stop"}


@pytest.mark.parametrize(
    "payload,param",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [5, 100000]}, "prompt"),
        ({"prompt": "hi", "top_k": 7}, None),  # the engine's SamplingParams ValueError
        ({}, "prompt"),
        ({"prompt": "x" * 300}, "prompt"),  # over the context length
        ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
        ({"prompt": "hi", "frequency_penalty": 1.0}, "frequency_penalty"),  # unsupported by the engine
    ],
)
async def test_completion_400(client: httpx.AsyncClient, payload: dict, param: str | None) -> None:
    err = assert_openai_error(await client.post("/v1/completions", json=payload), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)


async def test_bad_json_and_chat_template_errors(client: httpx.AsyncClient) -> None:
    assert_openai_error(
        await client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
    )
    assert_openai_error(await client.post("/v1/chat/completions", json={"messages": []}), 400)
    assert_openai_error(
        await client.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]}), 400
    )
    assert_openai_error(
        await client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}),
        400,
    )


async def test_unknown_model_and_route(client: httpx.AsyncClient) -> None:
    err = assert_openai_error(
        await client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404
    )
    assert err["param"] == "model" and err["code"] == "model_not_found"
    assert_openai_error(await client.get("/v1/nothing"), 404)
    assert_openai_error(await client.get("/v1/completions"), 405)


async def test_api_key() -> None:
    async for c, _ in make_client(api_key="sekrit"):
        assert_openai_error(await c.get("/v1/models"), 401)
        assert_openai_error(await c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer sekrit"})).status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


async def test_queue_full_429() -> None:
    engine = FakeAsyncLLM(delay_s=0.01, max_num_seqs=1)
    async for c, _ in make_client(engine, max_queue=0):
        tasks = [
            asyncio.create_task(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 20}))
            for _ in range(8)
        ]
        results = await asyncio.gather(*tasks)
        statuses = sorted(r.status_code for r in results)
        assert 429 in statuses and 200 in statuses, statuses
        rejected = next(r for r in results if r.status_code == 429)
        assert_openai_error(rejected, 429)
        assert rejected.headers["retry-after"]


async def test_loading_503() -> None:
    gate = asyncio.Event()
    engine = FakeAsyncLLM()
    loop = asyncio.get_running_loop()

    def slow_factory() -> FakeAsyncLLM:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
        return engine

    state = ServerState(ServerConfig())
    app = create_app(state.config, engine_factory=slow_factory, state=state)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            err = assert_openai_error(await c.get("/health"), 503)
            assert err["code"] == "model_loading"
            assert_openai_error(await c.post("/v1/completions", json={"prompt": "x"}), 503)
            gate.set()
            await _wait_ready(state)
            assert (await c.get("/health")).status_code == 200


async def test_drain_503_and_finish_in_flight() -> None:
    engine = FakeAsyncLLM(delay_s=0.01)
    async for c, state in make_client(engine):
        in_flight = asyncio.create_task(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 30}))
        await asyncio.sleep(0.05)
        drain = asyncio.create_task(state.drain(timeout_s=10))
        await asyncio.sleep(0.01)
        assert_openai_error(await c.post("/v1/completions", json={"prompt": "x"}), 503)
        assert_openai_error(await c.get("/health"), 503)
        r = await in_flight
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 30
        await asyncio.wait_for(drain, 5)


async def test_metrics_exposition(client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    text = (await client.get("/metrics")).text
    for name in (
        "xllm:num_requests_running",
        "xllm:num_requests_waiting",
        "xllm:kv_cache_usage_perc",
        "xllm:prefix_cache_hit_rate",
        "xllm:prompt_tokens_total",
        "xllm:generation_tokens_total",
        "xllm:time_to_first_token_seconds_bucket",
        "xllm:time_per_output_token_seconds_bucket",
        "xllm:e2e_request_latency_seconds_count",
        "xllm:kv_cache_blocks_used",
        "xllm:kv_cache_blocks_total",
    ):
        assert name in text, name
    assert 'xllm:generation_tokens_total{model_name="fake-model"} 3.0' in text


async def test_internal_error_is_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    async for c, state in make_client():

        def boom(*a: Any, **k: Any) -> None:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(state.serving, "chat_prompt", boom)
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        err = assert_openai_error(r, 500)
        assert "secret" not in r.text and "Traceback" not in r.text
        assert err["type"] == "server_error"


async def test_model_generation_defaults_apply_when_unset() -> None:
    engine = FakeAsyncLLM(generation_defaults={"temperature": 0.3, "top_p": 0.8})
    async for c, _ in make_client(engine):
        await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert (engine.last_params.temperature, engine.last_params.top_p) == (0.3, 0.8)
        await c.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 1, "temperature": 1.0, "top_p": 1.0}
        )
        assert (engine.last_params.temperature, engine.last_params.top_p) == (1.0, 1.0)


async def test_dead_engine_makes_health_503() -> None:
    engine = FakeAsyncLLM()
    async for c, _ in make_client(engine):
        engine.errored = True
        assert assert_openai_error(await c.get("/health"), 503)["code"] == "engine_dead"
        assert_openai_error(await c.post("/v1/completions", json={"prompt": "x"}), 503)

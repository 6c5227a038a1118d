"""The request schema is strict, and the published OpenAPI schema says what the server enforces.

OpenAI's API does not coerce types: a boolean is not an integer, "1" is not a number, and an
empty prompt is not a prompt. pydantic's lax mode used to accept `[[false]]` as the token list
`[[0]]` and `top_logprobs: false` as 0, and the schema allowed `prompt: ""` that the server then
refused. These tests pin each of those defects, over the real app and engine (in process, as in
test_app_unit.py), and check that the OpenAPI schema states the same limits the server enforces,
since schemathesis (test_serve_schemathesis.py) generates its requests from that schema.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_process import assert_openai_error

from xllm import AsyncLLM
from xllm.service.app import Phase, ServerConfig, ServerState, create_app

NAME = "tiny-llama"
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[AsyncLLM]:
    engine = AsyncLLM(
        model=str(tiny_llama_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_memory="4MiB"
    )
    yield engine
    asyncio.run(engine.shutdown())


async def _ready_app(engine: AsyncLLM, **config: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """(client, app) over a ready app that borrows `engine` (the module's; loading costs a second)."""
    state = ServerState(ServerConfig(served_model_name=NAME, **config))
    app = create_app(state.config, state=state, engine=engine)
    async with app.router.lifespan_context(app):
        for _ in range(6000):
            if state.phase is not Phase.LOADING:
                break
            await asyncio.sleep(0.01)
        assert state.phase is Phase.READY
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client, app


@pytest.fixture
async def client(engine: AsyncLLM) -> AsyncIterator[httpx.AsyncClient]:
    async for c, _ in _ready_app(engine):
        yield c


def _param(r: httpx.Response) -> str | None:
    return assert_openai_error(r, 400)["param"]


# ---- the named defects -----------------------------------------------------------------------


async def test_boolean_token_ids_are_not_a_prompt(client: httpx.AsyncClient) -> None:
    # Lax mode read [[false]] as the token prompt [[0]] and generated from it.
    r = await client.post("/v1/completions", json={"prompt": [[False]], "max_tokens": 1})
    assert _param(r) == "prompt.0.0"
    r = await client.post("/v1/completions", json={"prompt": [True, 5], "max_tokens": 1})
    assert _param(r) == "prompt.0"


async def test_top_logprobs_false_is_rejected(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "top_logprobs": False},
    )
    assert _param(r) == "top_logprobs"


async def test_empty_prompt_is_rejected_at_validation(client: httpx.AsyncClient) -> None:
    # Rejected by the schema's minLength (pydantic's message), not later by the tokenizer check.
    r = await client.post("/v1/completions", json={"prompt": ""})
    err = assert_openai_error(r, 400)
    assert err["param"] == "prompt"
    assert "at least 1 character" in err["message"], err
    r = await client.post("/v1/completions", json={"prompt": ["hi", ""]})
    assert _param(r) == "prompt.1"


async def test_boolean_max_tokens_is_rejected(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": True})
    assert _param(r) == "max_tokens"
    r = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": False}
    )
    assert _param(r) == "max_tokens"


async def test_string_temperature_is_rejected(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "temperature": "1"})
    assert _param(r) == "temperature"


async def test_integer_for_a_float_field_is_accepted(client: httpx.AsyncClient) -> None:
    # JSON has one number type: OpenAI (and its clients, which send `temperature=0` as 0) take 1
    # for 1.0, and JSON Schema's "integer" takes 1.0 for 1 (schemathesis sends such values).
    for body in (
        {"prompt": "hi", "max_tokens": 1, "temperature": 1, "top_p": 1, "presence_penalty": 0},
        {"prompt": "hi", "max_tokens": 1, "temperature": 0, "min_p": 0, "repetition_penalty": 1},
        {"prompt": [5.0, 6], "max_tokens": 1.0, "n": 1.0, "seed": 3.0},
    ):
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize(
    "payload,param",
    [
        ({"prompt": "hi", "n": True}, "n"),
        ({"prompt": "hi", "n": "1"}, "n"),
        ({"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "hi", "seed": "7"}, "seed"),
        ({"prompt": "hi", "top_p": True}, "top_p"),
        ({"prompt": "hi", "stream": "true"}, "stream"),
        ({"prompt": "hi", "stream": 1}, "stream"),
        ({"prompt": "hi", "echo": 0}, "echo"),
        ({"prompt": "hi", "logprobs": True}, "logprobs"),
        ({"prompt": "hi", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "hi", "model": 5}, "model"),
        ({"prompt": "hi", "stop": 5}, "stop"),
        ({"prompt": "hi", "stop": ""}, "stop"),
        ({"prompt": "hi", "stop": ["ok", ""]}, "stop.1"),
        ({"prompt": "hi", "stop_token_ids": [False]}, "stop_token_ids.0"),
        ({"prompt": "hi", "user": 1}, "user"),
        ({"prompt": "hi", "cache_salt": ""}, "cache_salt"),
        ({"prompt": "hi", "ignore_eos": "false"}, "ignore_eos"),
        # Unsupported or cross-field: still a 400 that names the field.
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": "hi", "logit_bias": {"5": 1}}, "logit_bias"),
        ({"prompt": "hi", "n": 2, "best_of": 3}, "best_of"),
        # The samplers hold top_k as an int32; a larger one used to fail the engine step (500).
        ({"prompt": "hi", "top_k": 2**31}, "top_k"),
    ],
)
async def test_completion_strict_types(client: httpx.AsyncClient, payload: dict, param: str) -> None:
    assert _param(await client.post("/v1/completions", json=payload)) == param


@pytest.mark.parametrize(
    "payload,param",
    [
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages.0.content.0.text",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "4"},
            "max_completion_tokens",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": "0"}, "frequency_penalty"),
        ({"messages": [{"role": "user"}], "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ],
)
async def test_chat_strict_types(client: httpx.AsyncClient, payload: dict, param: str) -> None:
    assert _param(await client.post("/v1/chat/completions", json=payload)) == param


async def test_large_seed_is_folded_not_refused(client: httpx.AsyncClient) -> None:
    # No upper bound is published for `seed` (one past 2**53 is not portable JSON), so any
    # non-negative integer is served, as the same seed modulo 2**63.
    outs = []
    for seed in (2**63 + 7, 7):
        body = {"prompt": "hi", "max_tokens": 4, "temperature": 1, "seed": seed, "ignore_eos": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        outs.append(r.json()["choices"][0]["text"])
    assert outs[0] == outs[1]


async def test_min_tokens_past_the_context_is_a_context_overflow(client: httpx.AsyncClient) -> None:
    # Without max_tokens the completion may fill the context; a min_tokens beyond that is the
    # same overflow as a too-long prompt (OpenAI's context_length_exceeded), not a bad field.
    r = await client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": None, "min_tokens": MAX_MODEL_LEN}
    )
    err = assert_openai_error(r, 400)
    assert err["param"] == "min_tokens" and err["code"] == "context_length_exceeded"


# ---- the published schema --------------------------------------------------------------------


def _schema(app: Any, name: str) -> dict[str, Any]:
    return app.openapi()["components"]["schemas"][name]


def _branches(prop: dict[str, Any]) -> list[dict[str, Any]]:
    return prop.get("anyOf", [prop])


def test_openapi_states_minimum_lengths() -> None:
    app = create_app(ServerConfig())  # the static schema: no engine needed
    completion = _schema(app, "CompletionRequest")
    prompt = _branches(completion["properties"]["prompt"])
    strings = [b for b in prompt if b.get("type") == "string"]
    assert strings and all(b.get("minLength") == 1 for b in strings), prompt
    lists = [b for b in prompt if b.get("type") == "array"]
    assert lists and all(b.get("minItems") == 1 for b in lists), prompt
    string_items = [b["items"] for b in lists if b["items"].get("type") == "string"]
    assert string_items and all(i.get("minLength") == 1 for i in string_items)
    stop = [b for b in _branches(completion["properties"]["stop"]) if b.get("type") != "null"]
    assert {b["type"] for b in stop} == {"string", "array"}
    assert all(b.get("minLength") == 1 for b in stop if b["type"] == "string")
    assert all(b["items"].get("minLength") == 1 for b in stop if b["type"] == "array")
    chat = _schema(app, "ChatCompletionRequest")
    assert chat["properties"]["messages"]["minItems"] == 1
    # What the server does not support is stated too, so a generated request never trips on it.
    assert _branches(completion["properties"]["suffix"])[0]["maxLength"] == 0
    assert _branches(chat["properties"]["logit_bias"])[0]["maxProperties"] == 0


def test_openapi_declares_every_answer() -> None:
    doc = create_app(ServerConfig()).openapi()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        # 422 is FastAPI's default for validation errors; this server answers them with 400.
        assert "422" not in responses
        assert {"400", "401", "404", "429", "500", "503"} <= set(responses)
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "securitySchemes" not in doc.get("components", {})


def test_openapi_declares_the_api_key() -> None:
    doc = create_app(ServerConfig(api_key="k")).openapi()
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/health"]["get"]


async def test_openapi_states_the_vocabulary_once_loaded(engine: AsyncLLM) -> None:
    # Token ids outside the vocabulary are refused (400) after validation; once the model is
    # known the schema says so, so that a request valid per the schema is not refused.
    async for client, app in _ready_app(engine):
        doc = (await client.get("/openapi.json")).json()
        prompt = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
        maxima = []
        for branch in _branches(prompt):
            items = branch.get("items", {})
            items = items.get("items", items)
            if items.get("type") == "integer":
                maxima.append(items["maximum"])
        vocab = app.state.xllm.serving.vocab_size
        assert maxima == [vocab - 1, vocab - 1], prompt
        assert (
            await client.post("/v1/completions", json={"prompt": [vocab - 1], "max_tokens": 1})
        ).status_code == 200
        assert (
            _param(await client.post("/v1/completions", json={"prompt": [vocab], "max_tokens": 1}))
            == "prompt"
        )


async def test_undeclared_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    # schemathesis's unsupported_method check: RFC 9110 wants the allowed methods listed.
    r = await client.put("/v1/completions", json={"prompt": "hi"})
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = await client.post("/health")
    assert r.status_code == 405 and "GET" in r.headers["allow"]

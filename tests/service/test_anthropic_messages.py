"""Anthropic's Messages API (`POST /v1/messages`) of a real `xllm serve`, driven by the `anthropic` client.

One server for the module, with an API key and a short context (as test_serve_openai.py), so
that the over-long prompt is cheap. Greedy answers are checked against the same server's
/v1/chat/completions for the same conversation: both APIs build one prompt and sample alike.
Raw HTTP (httpx) checks what the client hides: the SSE framing and the exact error JSON.
The loading 503 runs the app in process, since a real server's loading window is too short to hit.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from serve_process import ServeProcess, assert_openai_error

from xllm.engine.outputs import CompletionOutput
from xllm.service.anthropic_serving import stop_reason
from xllm.service.app import Phase, ServerConfig, ServerState, create_app

API_KEY = "sk-ant-test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 256
SYSTEM = "You are terse."
USER = [{"role": "user", "content": "Say something."}]
# The `anthropic` client 2.x has no sampling arguments (its API version dropped them); the
# server still takes Anthropic's `temperature`, `top_p` and `top_k`, sent as extra body fields.
GREEDY: dict[str, Any] = {"extra_body": {"temperature": 0}}
EVENT_ORDER = ["message_start", "content_block_start", "content_block_stop", "message_delta", "message_stop"]


@pytest.fixture(scope="module")
def server(start_server) -> ServeProcess:
    return start_server(
        "--api-key", API_KEY, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN)
    )


@pytest.fixture
def client(server: ServeProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def aclient(server: ServeProcess) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def post(server: ServeProcess, payload: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    headers = {"x-api-key": API_KEY} if headers is None else headers
    return httpx.post(f"{server.base_url}/v1/messages", json=payload, headers=headers, timeout=60)


def chat_completion(server: ServeProcess, messages: list[dict], max_tokens: int) -> dict:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def templated_len(model_dir: Path, messages: list[dict]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False).input_ids)


def assert_anthropic_error(r: httpx.Response, status: int, error_type: str) -> str:
    """The response has `status` and Anthropic's error JSON; returns the message."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == error_type, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]["message"]


def parse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each Anthropic SSE event, checking the `event:`/`data:` framing."""
    assert text.endswith("\n\n")
    events = []
    for block in text.strip("\n").split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        name, data = name_line[len("event: ") :], json.loads(data_line[len("data: ") :])
        assert data["type"] == name, block
        events.append((name, data))
    return events


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_stop_reason_mapping() -> None:
    def out(finish: str, stop: int | str | None = None) -> CompletionOutput:
        return CompletionOutput(index=0, text="x", token_ids=[5], finish_reason=finish, stop_reason=stop)

    assert stop_reason(out("stop")) == ("end_turn", None)  # EOS
    assert stop_reason(out("stop", 7)) == ("end_turn", None)  # a stop token id
    assert stop_reason(out("stop", "\n\n")) == ("stop_sequence", "\n\n")
    assert stop_reason(out("length")) == ("max_tokens", None)


def test_greedy_matches_chat_completions(server: ServeProcess, client: anthropic.Anthropic) -> None:
    r = client.messages.create(model=MODEL, max_tokens=8, system=SYSTEM, messages=USER, **GREEDY)
    chat = chat_completion(server, [{"role": "system", "content": SYSTEM}, *USER], 8)
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL
    assert r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"]
    assert r.content[0].text == chat["choices"][0]["message"]["content"]
    expected = {"length": "max_tokens", "stop": "end_turn"}[chat["choices"][0]["finish_reason"]]
    assert r.stop_reason == expected and r.stop_sequence is None
    assert r.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert r.usage.output_tokens == chat["usage"]["completion_tokens"]
    # Text blocks (in the system prompt and the message) are the same conversation as strings.
    blocks = client.messages.create(
        model=MODEL,
        max_tokens=8,
        system=[{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": USER[0]["content"]}]}],
        metadata={"user_id": "ignored"},
        **GREEDY,
    )
    assert blocks.content[0].text == r.content[0].text and blocks.usage == r.usage


def test_system_prompt_counts_in_input_tokens(client: anthropic.Anthropic, tiny_llama_dir: Path) -> None:
    plain = client.messages.create(model=MODEL, max_tokens=1, messages=USER)
    system = client.messages.create(model=MODEL, max_tokens=1, system=SYSTEM, messages=USER)
    assert plain.usage.input_tokens == templated_len(tiny_llama_dir, USER)
    assert system.usage.input_tokens == templated_len(
        tiny_llama_dir, [{"role": "system", "content": SYSTEM}, *USER]
    )
    assert system.usage.input_tokens > plain.usage.input_tokens


async def test_async_create_and_stream_events(aclient: anthropic.AsyncAnthropic) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, max_tokens=10, system=SYSTEM, messages=USER, **GREEDY)
    whole = await aclient.messages.create(**kwargs)
    stream = await aclient.messages.create(**kwargs, stream=True)
    events = [e async for e in stream]
    types = [e.type for e in events]
    assert [t for t in types if t != "content_block_delta"] == EVENT_ORDER
    deltas = events[2:-3]
    assert deltas and all(e.type == "content_block_delta" and e.delta.type == "text_delta" for e in deltas)
    assert "".join(e.delta.text for e in deltas) == whole.content[0].text
    start, delta = events[0].message, events[-2]
    assert (
        start.id.startswith("msg_")
        and start.content == []
        and start.usage.input_tokens == whole.usage.input_tokens
    )
    assert delta.delta.stop_reason == whole.stop_reason and delta.delta.stop_sequence is None
    assert delta.usage.output_tokens == whole.usage.output_tokens


def test_stream_helper_and_raw_sse(server: ServeProcess, client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, max_tokens=10, messages=USER)
    whole = client.messages.create(**kwargs, **GREEDY)
    with client.messages.stream(**kwargs, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage == whole.usage
    r = post(server, {**kwargs, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"].startswith("msg-")
    events = parse_events(r.text)
    names = [name for name, _ in events]
    # Anthropic's order, with the optional ping right after the block starts.
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert [n for n in names[3:] if n != "content_block_delta"] == EVENT_ORDER[2:]
    assert events[0][1]["message"]["id"] == "msg_" + r.headers["x-request-id"].split("-", 1)[1]
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == text


def test_stop_sequences_and_max_tokens(client: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=USER, **GREEDY)
    full = client.messages.create(max_tokens=16, **kwargs)
    text = full.content[0].text
    assert full.stop_reason == "max_tokens" and full.usage.output_tokens == 16, full
    assert len(text) >= 4, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    r = client.messages.create(max_tokens=16, stop_sequences=["never-in-there", stop], **kwargs)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == text[: text.index(stop)]
    with client.messages.stream(max_tokens=16, stop_sequences=[stop], **kwargs) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop
    assert final.content[0].text == r.content[0].text
    short = client.messages.create(max_tokens=3, **kwargs)
    assert short.stop_reason == "max_tokens" and short.stop_sequence is None
    assert short.usage.output_tokens == 3 and text.startswith(short.content[0].text)


# ---- errors: status, Anthropic's error JSON, the client's typed exception --------------------


@pytest.mark.parametrize(
    "payload,needle",
    [
        ({"model": MODEL, "messages": USER}, "max_tokens"),  # missing: FastAPI's 422 otherwise
        ({"model": MODEL, "max_tokens": 0, "messages": USER}, "max_tokens"),
        ({"model": MODEL, "max_tokens": True, "messages": USER}, "max_tokens"),  # strict: true is not 1
        ({"model": MODEL, "max_tokens": 4, "messages": USER, "temperature": 1.5}, "temperature"),
        ({"model": MODEL, "max_tokens": 4, "messages": USER, "top_k": 2**40}, "top_k"),  # past int32
        ({"model": MODEL, "max_tokens": 4, "messages": []}, "messages"),
        ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ],
)
def test_400_bad_field(server: ServeProcess, payload: dict, needle: str) -> None:
    message = assert_anthropic_error(post(server, payload), 400, "invalid_request_error")
    assert needle in message


def test_400_bad_field_client_and_bad_json(server: ServeProcess, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model=MODEL, max_tokens=4, messages=USER, extra_body={"temperature": 1.5})
    assert exc.value.status_code == 400 and exc.value.body["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        f"{server.base_url}/v1/messages",
        content=b'{"messages": [',
        headers={"x-api-key": API_KEY, "content-type": "application/json"},
    )
    assert "JSON" in assert_anthropic_error(r, 400, "invalid_request_error")


def test_400_unsupported_content_block(server: ServeProcess, client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    message = assert_anthropic_error(
        post(server, {"model": MODEL, "max_tokens": 4, "messages": messages}), 400, "invalid_request_error"
    )
    assert "'image'" in message and "not support" in message
    tool_use = [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}
    ]
    with pytest.raises(anthropic.BadRequestError, match="tool_use"):
        client.messages.create(model=MODEL, max_tokens=4, messages=[*USER, *tool_use])


def test_401_without_or_with_wrong_key(server: ServeProcess) -> None:
    assert_anthropic_error(post(server, {}, headers={}), 401, "authentication_error")
    assert_anthropic_error(post(server, {}, headers={"x-api-key": "nope"}), 401, "authentication_error")
    assert_anthropic_error(
        post(server, {}, headers={"Authorization": "Bearer nope"}), 401, "authentication_error"
    )
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base_url, api_key="nope", max_retries=0).messages.create(
            model=MODEL, max_tokens=1, messages=USER
        )
    # Either header carries the right key; the OpenAI routes keep OpenAI's shape and header.
    payload = {"model": MODEL, "max_tokens": 1, "messages": USER}
    assert post(server, payload, headers={"x-api-key": API_KEY}).status_code == 200
    assert post(server, payload, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    models = httpx.get(f"{server.base_url}/v1/models", headers={"x-api-key": API_KEY})
    assert assert_openai_error(models, 401)["type"] == "authentication_error"


def test_404_unknown_model(server: ServeProcess, client: anthropic.Anthropic) -> None:
    payload = {"model": "claude-sonnet-4-5", "max_tokens": 4, "messages": USER}
    assert "claude-sonnet-4-5" in assert_anthropic_error(post(server, payload), 404, "not_found_error")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=USER)


def test_400_prompt_too_long(server: ServeProcess, client: anthropic.Anthropic) -> None:
    long = [{"role": "user", "content": "word " * 400}]
    message = assert_anthropic_error(
        post(server, {"model": MODEL, "max_tokens": 4, "messages": long}), 400, "invalid_request_error"
    )
    assert "maximum context length" in message
    with pytest.raises(anthropic.BadRequestError, match="context length"):
        client.messages.create(model=MODEL, max_tokens=4, messages=long, stream=True)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model=MODEL, max_tokens=MAX_MODEL_LEN, messages=USER)


async def test_disconnected_streams_free_blocks_and_server_stays_healthy(
    server: ServeProcess, client: anthropic.Anthropic
) -> None:
    payload = {"model": MODEL, "max_tokens": 200, "messages": USER, "stream": True}
    headers = {"x-api-key": API_KEY}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60) as http:

        async def start_and_drop() -> None:
            async with http.stream("POST", "/v1/messages", json=payload) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line == "event: content_block_delta":
                        return  # leaving the block closes the connection mid-stream

        generated_before = metric((await http.get("/metrics")).text, "xllm:generation_tokens_total")
        await asyncio.gather(*(start_and_drop() for _ in range(6)))
        # The client's own stream helper, left after its first piece of text.
        with client.messages.stream(model=MODEL, max_tokens=200, messages=USER) as stream:
            assert next(iter(stream.text_stream)) is not None
        deadline = time.monotonic() + 20
        while True:
            text = (await http.get("/metrics")).text
            used, running = (
                metric(text, "xllm:kv_cache_blocks_used"),
                metric(text, "xllm:num_requests_running"),
            )
            if used == 0 and running == 0:
                break
            assert time.monotonic() < deadline, f"blocks still used after disconnects: {used=} {running=}"
            await asyncio.sleep(0.1)
        # Aborted, not run to the end: far fewer tokens than the 7 x 200 asked for.
        assert metric(text, "xllm:generation_tokens_total") - generated_before < 0.5 * 7 * 200
        assert metric(text, "xllm:kv_cache_blocks_total") > 0
        assert (await http.get("/health")).status_code == 200
    r = client.messages.create(model=MODEL, max_tokens=2, messages=USER)
    assert r.usage.output_tokens >= 1 and r.stop_reason in ("max_tokens", "end_turn")


async def test_503_while_loading_in_anthropic_shape() -> None:
    gate = threading.Event()

    def never_loads() -> Any:
        gate.wait(30)
        raise RuntimeError("the test's loader gives up")

    state = ServerState(ServerConfig(served_model_name=MODEL))
    app = create_app(state.config, engine_factory=never_loads, state=state)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            payload = {"model": MODEL, "max_tokens": 1, "messages": USER}
            r = await c.post("/v1/messages", json=payload)
            assert_anthropic_error(r, 503, "overloaded_error")
            assert r.headers["retry-after"]
            assert_openai_error(await c.post("/v1/completions", json={"prompt": "x"}), 503)
            gate.set()
            deadline = time.monotonic() + 10
            while state.phase is Phase.LOADING:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert "failed to load" in assert_anthropic_error(
                await c.post("/v1/messages", json=payload), 503, "overloaded_error"
            )

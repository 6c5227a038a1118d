"""The HTTP layer in process over the real `AsyncLLM`: schemas, OpenAI error JSON, SSE, draining.

The app runs in the test's event loop (httpx's ASGI transport, lifespan entered by hand) over
a real engine on the tiny float32 Llama checkpoint, so these stay fast (no subprocess) while
every answer comes from the product itself. Texts are checked against offline `LLM.generate`
on the same checkpoint; lengths are pinned with `max_tokens` and `ignore_eos`.
tests/service/test_serve_openai.py repeats the user-visible checks against a real `xllm serve`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from xllm import LLM, AsyncLLM, SamplingParams
from xllm.engine.llm_engine import EngineStats
from xllm.service.app import Phase, ServerConfig, ServerState, create_app
from xllm.service.engine_client import EngineClient
from xllm.service.serving import sse

NAME = "tiny-llama"
MAX_MODEL_LEN = 256
BLOCK_SIZE = 16


def kv_bytes(path: Path, num_blocks: int) -> int:
    """kv_cache_memory that gives exactly `num_blocks` usable float32 blocks of the model at `path`."""
    from xllm.models import ModelConfig

    c = ModelConfig.from_pretrained(path)
    # One block more than asked: the engine reserves physical block 0 as the null block.
    return 2 * c.num_layers * BLOCK_SIZE * c.num_kv_heads * c.head_dim * 4 * (num_blocks + 1)


def engine_kwargs(path: Path, **kw: Any) -> dict[str, Any]:
    return {
        "dtype": "float32",
        "max_model_len": MAX_MODEL_LEN,
        "block_size": BLOCK_SIZE,
        "kv_cache_memory": kv_bytes(path, 128),
        **kw,
    }


def new_engine(path: Path, **kw: Any) -> AsyncLLM:
    return AsyncLLM(model=str(path), **engine_kwargs(path, **kw))


@pytest.fixture(scope="module")
def shared_engine(tiny_llama_dir: Path) -> Iterator[AsyncLLM]:
    """One real engine for the module (loading costs a second); each app borrows it, none owns it."""
    engine = new_engine(tiny_llama_dir)
    yield engine
    asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def ref_llm(tiny_llama_dir: Path) -> LLM:
    """Offline generation on the same checkpoint: what the server's answers must match."""
    return LLM(model=str(tiny_llama_dir), **engine_kwargs(tiny_llama_dir))


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def ref_text(llm: LLM, prompt: Any, max_tokens: int, **kw: Any) -> str:
    return llm.generate(prompt, greedy(max_tokens, **kw), use_tqdm=False)[0].outputs[0].text


async def wait_idle(engine: AsyncLLM, timeout_s: float = 20.0) -> None:
    """Every request the test started has left the engine and given its KV blocks back."""
    core = engine.engine
    deadline = time.monotonic() + timeout_s
    while core.requests or core.kv_cache.num_used_blocks:
        if time.monotonic() > deadline:
            pytest.fail(f"engine not idle: {list(core.requests)}, {core.kv_cache.num_used_blocks} blocks")
        await asyncio.sleep(0.01)


async def _wait_ready(state: ServerState, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while state.phase is Phase.LOADING:
        if time.monotonic() > deadline:
            raise AssertionError("the engine never became ready")
        await asyncio.sleep(0.01)


async def make_client(
    engine: AsyncLLM, served_model_name: str | None = NAME, serve: EngineClient | None = None, **config: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, ServerState]]:
    """A client of an app serving `serve` (default: `engine` itself), waiting at the end until
    `engine` is idle again."""
    state = ServerState(ServerConfig(served_model_name=served_model_name, **config))
    app = create_app(state.config, state=state, engine=serve if serve is not None else engine)
    async with app.router.lifespan_context(app):
        await _wait_ready(state)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            yield client, state
    await wait_idle(engine)


@pytest.fixture
async def client(shared_engine: AsyncLLM) -> AsyncIterator[httpx.AsyncClient]:
    async for c, _ in make_client(shared_engine):
        yield c


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def parse_sse(text: str) -> list[Any]:
    assert text.endswith("\n\n")
    events = [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_sse_format() -> None:
    assert sse({"a": 1}) == 'data: {"a":1}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"


async def test_embedded_default_model_is_served_as_xllm_default(tmp_path, monkeypatch) -> None:
    # `xllm serve` without --model: the name clients send is "xllm-default", not a cache path.
    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path))
    engine = AsyncLLM(model=None, max_model_len=128, kv_cache_memory="4MiB")
    try:
        async for client, _ in make_client(engine, served_model_name=None):
            models = (await client.get("/v1/models")).json()
            assert [m["id"] for m in models["data"]] == ["xllm-default"]
            r = await client.post(
                "/v1/completions", json={"model": "xllm-default", "prompt": "hi", "max_tokens": 2}
            )
            assert r.status_code == 200 and r.json()["model"] == "xllm-default"
    finally:
        await engine.shutdown()


async def test_health_models_version(shared_engine: AsyncLLM) -> None:
    # No --served-model-name: the model is listed under the engine's own name.
    async for client, _ in make_client(shared_engine, served_model_name=None):
        name = shared_engine.model_name
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert "version" in (await client.get("/version")).json()
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list" and models["data"][0]["id"] == name
        assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
        assert (await client.get(f"/v1/models/{name}")).json()["id"] == name
        assert_openai_error(await client.get("/v1/models/other"), 404)


async def test_completion_and_usage(client: httpx.AsyncClient, ref_llm: LLM) -> None:
    r = await client.post(
        "/v1/completions",
        json={"model": NAME, "prompt": "hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
    )
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "text_completion" and body["model"] == NAME
    assert body["choices"][0]["text"] == ref_text(ref_llm, "hi", 5)
    assert body["choices"][0]["finish_reason"] == "length"
    n_prompt = len(ref_llm.tokenizer("hi")["input_ids"])
    assert body["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": 5,
        "total_tokens": n_prompt + 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_completion_batch_prompts_n_echo_logprobs(client: httpx.AsyncClient, ref_llm: LLM) -> None:
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": ["x y", "yz"],
            "max_tokens": 2,
            "n": 2,
            "echo": True,
            "logprobs": 1,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    body = r.json()
    assert r.status_code == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    ref = ref_llm.generate(["x y", "yz"], greedy(2, logprobs=1), use_tqdm=False)
    for k, prompt in enumerate(["x y", "yz"]):
        for choice in body["choices"][2 * k : 2 * k + 2]:  # greedy: both choices are the same
            assert choice["text"] == prompt + ref[k].outputs[0].text
    lp = body["choices"][0]["logprobs"]
    out = ref[0].outputs[0]
    n_prompt = len(ref[0].prompt_token_ids)
    assert len(lp["tokens"]) == n_prompt + 2
    assert lp["tokens"][-2:] == [ref_llm.tokenizer.decode([t]) for t in out.token_ids]
    want = [out.logprobs[i][t].logprob for i, t in enumerate(out.token_ids)]
    assert lp["token_logprobs"][-2:] == pytest.approx(want, abs=1e-4)
    assert lp["token_logprobs"][0] is None  # the first prompt token has no logprob
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]


async def test_completion_token_prompts(client: httpx.AsyncClient, ref_llm: LLM) -> None:
    r = await client.post(
        "/v1/completions",
        json={"prompt": [[5, 70], [5, 71, 72]], "max_tokens": 1, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert [c["text"] for c in body["choices"]] == [
        ref_text(ref_llm, [5, 70], 1),
        ref_text(ref_llm, [5, 71, 72], 1),
    ]


async def test_completion_stream(client: httpx.AsyncClient, ref_llm: LLM) -> None:
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": "hi",
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(r.text)
    assert all(c["object"] == "text_completion" and c["model"] == NAME for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == ref_text(ref_llm, "hi", 4)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_chat_and_stream(client: httpx.AsyncClient, ref_llm: LLM) -> None:
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "hey"}]},
    ]
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "hey"}]
    ref = ref_llm.chat(plain, greedy(3, logprobs=2), use_tqdm=False)[0].outputs[0]
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": msgs,
            "max_completion_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert content[0]["token"] == ref_llm.tokenizer.decode([ref.token_ids[0]])
    assert content[0]["logprob"] == pytest.approx(ref.logprobs[0][ref.token_ids[0]].logprob, abs=1e-4)
    assert len(content[0]["top_logprobs"]) == 2
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": msgs,
            "max_tokens": 3,
            "stream": True,
            "n": 2,
            "temperature": 0,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(r.text)
    # Each choice's role comes alone in its first delta, before any content.
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    for i in (0, 1):
        mine = [c for c in chunks[2:-1] if c["choices"][0]["index"] == i]
        assert all("role" not in c["choices"][0]["delta"] for c in mine)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in mine) == ref.text
        assert mine[-1]["choices"][0]["finish_reason"] == "length"


async def test_stop_sequence(client: httpx.AsyncClient, ref_llm: LLM) -> None:
    full = ref_text(ref_llm, "hi", 8)
    assert len(full) >= 4, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = await client.post(
        "/v1/completions",
        json={"prompt": "hi", "max_tokens": 8, "stop": stop, "temperature": 0, "ignore_eos": True},
    )
    assert r.json()["choices"][0] == {
        "index": 0,
        "text": full[: full.index(stop)],
        "logprobs": None,
        "finish_reason": "stop",
    }


@pytest.mark.parametrize(
    "payload,param",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [5, 100000]}, "prompt"),  # outside the vocabulary
        ({"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, None),  # the engine's SamplingParams ValueError
        ({}, "prompt"),
        ({"prompt": "x" * 300}, "prompt"),  # over the context length
        ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
        ({"prompt": "hi", "frequency_penalty": 3.0}, "frequency_penalty"),
    ],
)
async def test_completion_400(client: httpx.AsyncClient, payload: dict, param: str | None) -> None:
    err = assert_openai_error(await client.post("/v1/completions", json=payload), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)


async def test_bad_json_and_chat_errors(client: httpx.AsyncClient) -> None:
    assert_openai_error(
        await client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
    )
    assert_openai_error(await client.post("/v1/chat/completions", json={"messages": []}), 400)
    assert_openai_error(
        await client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}),
        400,
    )
    long = [{"role": "user", "content": "x" * 300}]  # the templated prompt is over the context length
    err = assert_openai_error(await client.post("/v1/chat/completions", json={"messages": long}), 400)
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"


async def test_unknown_model_and_route(client: httpx.AsyncClient) -> None:
    err = assert_openai_error(
        await client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404
    )
    assert err["param"] == "model" and err["code"] == "model_not_found"
    assert_openai_error(await client.get("/v1/nothing"), 404)
    assert_openai_error(await client.get("/v1/completions"), 405)


async def test_api_key(shared_engine: AsyncLLM) -> None:
    async for c, _ in make_client(shared_engine, api_key="sekrit"):
        assert_openai_error(await c.get("/v1/models"), 401)
        assert_openai_error(await c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer sekrit"})).status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


async def test_queue_full_429(tiny_llama_dir: Path) -> None:
    engine = new_engine(tiny_llama_dir, max_num_seqs=1)
    try:
        async for c, _ in make_client(engine, max_queue=0):
            payload = {"prompt": "x", "max_tokens": 20, "ignore_eos": True}
            results = await asyncio.gather(*(c.post("/v1/completions", json=payload) for _ in range(8)))
            statuses = sorted(r.status_code for r in results)
            assert 429 in statuses and 200 in statuses, statuses
            assert set(statuses) == {200, 429}, statuses
            rejected = next(r for r in results if r.status_code == 429)
            assert assert_openai_error(rejected, 429)["code"] == "queue_full"
            assert rejected.headers["retry-after"]
            ok = next(r for r in results if r.status_code == 200)
            assert ok.json()["usage"]["completion_tokens"] == 20
    finally:
        await engine.shutdown()


async def test_loading_503(tiny_llama_dir: Path) -> None:
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_factory() -> AsyncLLM:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
        return new_engine(tiny_llama_dir)

    # The app built this engine, so it shuts it down when the lifespan ends.
    state = ServerState(ServerConfig(served_model_name=NAME))
    app = create_app(state.config, engine_factory=slow_factory, state=state)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            err = assert_openai_error(await c.get("/health"), 503)
            assert err["code"] == "model_loading"
            assert_openai_error(await c.post("/v1/completions", json={"prompt": "x"}), 503)
            gate.set()
            await _wait_ready(state)
            assert (await c.get("/health")).status_code == 200
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert state.engine is not None and not state.engine.is_running


async def test_borrowed_engine_outlives_the_app(shared_engine: AsyncLLM) -> None:
    async for c, _ in make_client(shared_engine):
        assert (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200
    # create_app(engine=...) leaves the caller's engine running when the app's lifespan ends.
    outs = [o async for o in shared_engine.generate([5, 6], greedy(2), "after-app")]
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2


async def test_drain_503_and_finish_in_flight(shared_engine: AsyncLLM) -> None:
    n_tokens = 200  # long enough to still run while the drain starts
    async for c, state in make_client(shared_engine):
        in_flight = asyncio.create_task(
            c.post("/v1/completions", json={"prompt": "x", "max_tokens": n_tokens, "ignore_eos": True})
        )
        deadline = time.monotonic() + 30
        while not state.active_ids:  # the request has reached the engine
            assert time.monotonic() < deadline and not in_flight.done()
            await asyncio.sleep(0.005)
        drain = asyncio.create_task(state.drain(timeout_s=60))
        await asyncio.sleep(0)
        assert state.phase is Phase.DRAINING and state.in_flight == 1
        assert_openai_error(await c.post("/v1/completions", json={"prompt": "x"}), 503)
        assert assert_openai_error(await c.get("/health"), 503)["code"] == "draining"
        r = await in_flight
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == n_tokens
        await asyncio.wait_for(drain, 10)
        assert state.in_flight == 0


async def test_metrics_exposition(client: httpx.AsyncClient, shared_engine: AsyncLLM) -> None:
    before = shared_engine.stats().generation_tokens_total
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200
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
        "xllm:spec_decode_num_draft_tokens_total",
        "xllm:spec_decode_num_accepted_tokens_total",
        'xllm:kv_transfers_total{direction="sent"',
        "xllm:kv_transfer_receive_seconds_bucket",
        "xllm:kv_holds",
    ):
        assert name in text, name
    after = shared_engine.stats().generation_tokens_total
    assert after == before + 3
    assert f'xllm:generation_tokens_total{{model_name="{NAME}"}} {float(after)}' in text
    assert f'xllm:e2e_request_latency_seconds_count{{model_name="{NAME}"}} 1.0' in text


async def test_internal_error_is_generic(shared_engine: AsyncLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    async for c, state in make_client(shared_engine):

        def boom(*a: Any, **k: Any) -> None:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(state.serving, "chat_prompt", boom)  # an injected fault, not a stand-in
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        err = assert_openai_error(r, 500)
        assert "secret" not in r.text and "Traceback" not in r.text
        assert err["type"] == "server_error"


@pytest.fixture(scope="module")
def defaults_model_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with sampling defaults in its generation_config.json (a copy: the
    session's checkpoint is shared and read-only)."""
    out = tmp_path_factory.mktemp("llama-tiny-defaults") / "model"
    shutil.copytree(tiny_llama_dir, out)
    gen = json.loads((out / "generation_config.json").read_text())
    gen.update(temperature=0.3, top_p=0.8)
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


async def test_model_generation_defaults_apply_when_unset(defaults_model_dir: Path, ref_llm: LLM) -> None:
    engine = new_engine(defaults_model_dir)

    def ref(**kw: Any) -> str:
        params = SamplingParams(max_tokens=8, ignore_eos=True, seed=1234, **kw)
        return ref_llm.generate("x", params, use_tqdm=False)[0].outputs[0].text

    with_defaults, plain = ref(temperature=0.3, top_p=0.8), ref(temperature=1.0, top_p=1.0)
    assert with_defaults != plain  # the seed tells the two settings apart
    try:
        async for c, _ in make_client(engine):
            payload = {"prompt": "x", "max_tokens": 8, "ignore_eos": True, "seed": 1234}
            r = await c.post("/v1/completions", json=payload)
            assert r.json()["choices"][0]["text"] == with_defaults
            r = await c.post("/v1/completions", json={**payload, "temperature": 1.0, "top_p": 1.0})
            assert r.json()["choices"][0]["text"] == plain
    finally:
        await engine.shutdown()


async def test_dead_engine_makes_health_503(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = new_engine(tiny_llama_dir)
    try:
        async for c, _ in make_client(engine):
            assert (await c.get("/health")).status_code == 200

            def loop_fault() -> bool:
                raise RuntimeError("injected engine-loop fault")

            # A fault in the engine loop itself (not in one request's step) kills the loop.
            monkeypatch.setattr(engine.engine, "has_unfinished_requests", loop_fault)
            engine.start()
            deadline = time.monotonic() + 10
            while not engine.errored:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert assert_openai_error(await c.get("/health"), 503)["code"] == "engine_dead"
            assert_openai_error(await c.post("/v1/completions", json={"prompt": "x"}), 503)
            monkeypatch.undo()
    finally:
        await engine.shutdown()


# ---- the engine behind the server: the EngineClient protocol ---------------------------------

# What the server may use of an engine, and nothing more (the protocol is kept this small so
# that a cluster router can implement it over HTTP).
ENGINE_CLIENT_MEMBERS = {
    "tokenizer",
    "max_model_len",
    "max_num_seqs",
    "model_name",
    "errored",
    "generate",
    "abort",
    "send_held_kv",
    "stats",
    "cached_block_digests",
    "default_sampling_params",
    "add_dead_callback",
    "shutdown",
}


class ProtocolOnlyEngine:
    """An `EngineClient` and nothing else: every member of the protocol delegates to a real
    `AsyncLLM`, and nothing more of it is reachable, so a server reaching past the protocol
    (its config, its engine core) sees an AttributeError or a default instead of the answer."""

    __slots__ = ("_engine", "_shutdowns")

    def __init__(self, engine: AsyncLLM) -> None:
        self._engine = engine
        self._shutdowns = 0

    # The protocol's properties, read through to the engine.
    tokenizer = property(lambda self: self._engine.tokenizer)
    max_model_len = property(lambda self: self._engine.max_model_len)
    max_num_seqs = property(lambda self: self._engine.max_num_seqs)
    model_name = property(lambda self: self._engine.model_name)
    errored = property(lambda self: self._engine.errored)

    def generate(
        self, prompt: Any, sampling_params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[Any]:
        return self._engine.generate(prompt, sampling_params, request_id, priority)

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    def send_held_kv(self, transfer_id: str, destination: str, first_block: int, num_tokens: int) -> Any:
        return self._engine.send_held_kv(transfer_id, destination, first_block, num_tokens)

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def cached_block_digests(self, limit: int) -> list[bytes]:
        return self._engine.cached_block_digests(limit)

    def default_sampling_params(self) -> SamplingParams:
        return self._engine.default_sampling_params()

    def add_dead_callback(self, callback: Callable[[BaseException], None]) -> None:
        self._engine.add_dead_callback(callback)

    async def shutdown(self) -> None:
        self._shutdowns += 1  # the module's engine is borrowed: never passed on


def test_async_llm_is_an_engine_client(shared_engine: AsyncLLM) -> None:
    engine: EngineClient = shared_engine  # what a type checker verifies member by member
    assert isinstance(engine, EngineClient)
    assert not isinstance(object(), EngineClient)
    assert {n for n in dir(ProtocolOnlyEngine) if not n.startswith("_")} == ENGINE_CLIENT_MEMBERS
    assert isinstance(ProtocolOnlyEngine(shared_engine), EngineClient)


async def test_server_needs_only_the_engine_client_protocol(shared_engine: AsyncLLM, ref_llm: LLM) -> None:
    engine = ProtocolOnlyEngine(shared_engine)
    # No --served-model-name, and a --max-queue whose check reads the engine's capacity.
    async for c, _ in make_client(shared_engine, served_model_name=None, serve=engine, max_queue=4):
        assert (await c.get("/health")).json() == {"status": "ok"}
        models = (await c.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [shared_engine.model_name]
        name = shared_engine.model_name
        payload = {"model": name, "prompt": "hi", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        r = await c.post("/v1/completions", json=payload)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref_text(ref_llm, "hi", 5)
        messages = [{"role": "user", "content": "hey"}]
        ref = ref_llm.chat(messages, greedy(3), use_tqdm=False)[0].outputs[0].text
        r = await c.post(
            "/v1/chat/completions",
            json={
                "messages": messages,
                "max_tokens": 3,
                "n": 2,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        chunks = parse_sse(r.text)
        for i in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
            assert "".join(m["delta"].get("content") or "" for m in mine) == ref
        # Anthropic's API has no ignore_eos: its reference may stop at EOS.
        plain = ref_llm.chat(messages, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        r = await c.post(
            "/v1/messages", json={"model": name, "max_tokens": 3, "messages": messages, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        assert r.json()["content"][0]["text"] == plain[0].outputs[0].text
        text = (await c.get("/metrics")).text
        assert f'xllm:engine_dead{{model_name="{name}"}} 0.0' in text
        assert "xllm:num_failed_steps_total" in text
    assert engine._shutdowns == 0  # served, not owned


# ---- one delta stream, rendered per endpoint --------------------------------------------------


async def test_streams_send_what_whole_responses_hold(
    client: httpx.AsyncClient, shared_engine: AsyncLLM
) -> None:
    # A stop string that never matches holds back the last 15 characters of the text, so many
    # tokens add no text when they come; their logprobs must still be sent once, in order, at
    # their offsets in the text.
    common = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "stop": "#" * 16}
    payload = {**common, "prompt": ["x y", "yz"], "n": 2, "echo": True, "logprobs": 2}
    before = shared_engine.stats().prompt_tokens_total
    whole = (await client.post("/v1/completions", json=payload)).json()
    # One engine request per prompt (the engine samples its n choices): each prompt counts once.
    assert shared_engine.stats().prompt_tokens_total - before == whole["usage"]["prompt_tokens"]
    chunks = parse_sse((await client.post("/v1/completions", json={**payload, "stream": True})).text)
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(m["text"] for m in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        streamed = {k: [x for m in mine for x in m["logprobs"][k]] for k in lp}
        assert streamed["tokens"] == lp["tokens"] and len(lp["tokens"]) > 12
        assert streamed["text_offset"] == lp["text_offset"]
        assert lp["text_offset"] == list(itertools.accumulate((len(t) for t in lp["tokens"][:-1]), initial=0))
        assert streamed["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-4)

    payload = {
        **common,
        "messages": [{"role": "user", "content": "hey"}],
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = (await client.post("/v1/chat/completions", json=payload)).json()["choices"][0]
    chunks = parse_sse((await client.post("/v1/chat/completions", json={**payload, "stream": True})).text)
    pieces = [c["choices"][0] for c in chunks[1:]]  # after the role chunk
    assert "".join(p["delta"]["content"] for p in pieces) == whole["message"]["content"]
    content = [t for p in pieces for t in p["logprobs"]["content"]]
    assert [t["token"] for t in content] == [t["token"] for t in whole["logprobs"]["content"]]
    assert len(content) == 12 and pieces[-1]["finish_reason"] == "length"

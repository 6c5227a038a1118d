"""A real `xllm serve` process driven by the official `openai` client: what a user of the API sees.

One server for the module, started with an API key and a short context so that the over-long
prompt case is cheap. Greedy results are compared with `LLM.generate` on the same checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_process import REPO_ROOT, ServeProcess, assert_openai_error

API_KEY = "sk-test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 256
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(start_server) -> ServeProcess:
    return start_server(
        "--api-key", API_KEY, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN)
    )


@pytest.fixture(scope="module")
def reference_llm(tiny_llama_dir: Path):
    from xllm import LLM

    llm = LLM(model=str(tiny_llama_dir), max_model_len=MAX_MODEL_LEN)
    yield llm
    shutdown = getattr(llm, "shutdown", None)
    if callable(shutdown):
        shutdown()


def greedy(llm, prompts: list, max_tokens: int) -> list[str]:
    from xllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def chat_prompt_ids(tiny_llama_dir: Path, messages: list[dict]) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {"prompt_token_ids": tok(text, add_special_tokens=False).input_ids}


@pytest.fixture
def client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture
def aclient(server: ServeProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_health_answered_loading_before_ready(server: ServeProcess) -> None:
    statuses = [s for s, _ in server.health_log]
    assert statuses[-1] == 200
    loading = [body for s, body in server.health_log if s == 503]
    assert loading, "the model loaded before /health ever answered; expected 503 while loading"
    assert loading[0]["error"]["code"] == "model_loading"


def test_models_version_health(server: ServeProcess, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # open without the key
    assert "version" in httpx.get(f"{server.base_url}/version").json()


def test_completion_greedy_matches_llm(client: openai.OpenAI, reference_llm) -> None:
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == greedy(reference_llm, [prompt], 8)[0]
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0


def test_completion_batch_token_prompts_echo_logprobs(client: openai.OpenAI, reference_llm) -> None:
    r = client.completions.create(
        model=MODEL, prompt=[[1, 20, 30], [1, 40]], max_tokens=4, temperature=0, logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == greedy(reference_llm, [[1, 20, 30], [1, 40]], 4)
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) >= 1
        assert all(len(top) >= 1 for top in c.logprobs.top_logprobs)
    r = client.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, echo=True, n=2
    )
    assert len(r.choices) == 2 and all(c.text.startswith("Hello there") for c in r.choices)


def test_completion_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def _sse_events(server: ServeProcess, path: str, payload: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.base_url}{path}", json=payload, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _piece(choice: dict) -> str:
    return choice["text"] if "text" in choice else choice["delta"].get("content", "")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_return_token_ids_and_resume_continue_a_stream(server: ServeProcess, path: str) -> None:
    """vLLM's return_token_ids, and the router's resume: cut a stream anywhere, resume it with
    what was sent, and the client has exactly the uninterrupted text and tokens, once each."""
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True}
    body |= {"prompt": "Once upon a time"} if "chat" not in path else {"messages": MESSAGES}
    plain = _sse_events(server, path, body)
    assert all("token_ids" not in c for e in plain for c in e["choices"])  # not asked: not sent
    events = _sse_events(server, path, body | {"return_token_ids": True})
    prompt_ids = (events[0]["choices"][0] if "chat" not in path else events[0])["prompt_token_ids"]
    assert prompt_ids
    pieces = [(_piece(c), c.get("token_ids", [])) for e in events for c in e["choices"]]
    whole_text = "".join(t for t, _ in pieces)
    whole_ids = [i for _, ids in pieces for i in ids]
    assert whole_text == "".join(_piece(c) for e in plain for c in e["choices"])
    assert len(whole_ids) == 24
    non_stream = httpx.post(
        f"{server.base_url}{path}", json=body | {"stream": False, "return_token_ids": True}, headers=AUTH
    ).json()
    assert non_stream["choices"][0]["token_ids"] == whole_ids
    for cut in (2, len(pieces) // 2):
        sent_text = "".join(t for t, _ in pieces[:cut])
        sent_ids = [i for _, ids in pieces[:cut] for i in ids]
        assert sent_ids, "the cut must fall after some tokens"
        resume = {"token_ids": sent_ids, "text_offset": len(sent_text)}
        rest = _sse_events(
            server,
            path,
            body | {"return_token_ids": True, "resume": resume, "stream_options": {"include_usage": True}},
        )
        assert all(
            c.get("delta", {}).get("role") is None for e in rest for c in e["choices"]
        )  # no second role
        rest_text = "".join(_piece(c) for e in rest for c in e["choices"])
        rest_ids = [i for e in rest for c in e["choices"] for i in c.get("token_ids", [])]
        assert sent_text + rest_text == whole_text
        assert sent_ids + rest_ids == whole_ids
        assert rest[-1]["usage"]["completion_tokens"] == 24
        assert rest[-1]["usage"]["prompt_tokens"] == len(prompt_ids)


def test_resume_refused_for_n_above_one(server: ServeProcess) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "n": 2, "max_tokens": 4, "resume": {"token_ids": [5]}},
        headers=AUTH,
    )
    assert assert_openai_error(r, 400)["param"] == "resume"


def test_chat_sync_matches_llm(client: openai.OpenAI, reference_llm, tiny_llama_dir: Path) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert (
        r.choices[0].message.content
        == greedy(reference_llm, [chat_prompt_ids(tiny_llama_dir, MESSAGES)], 8)[0]
    )
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


async def test_chat_async_and_stream(aclient: openai.AsyncOpenAI) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    whole = (await aclient.chat.completions.create(**kwargs)).choices[0].message.content
    stream = await aclient.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_chat_logprobs_and_vllm_fields(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0.7,
        seed=3,
        logprobs=True,
        top_logprobs=3,
        extra_body={
            "top_k": 20,
            "min_p": 0.01,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "min_tokens": 5,
        },
    )
    content = r.choices[0].logprobs.content
    assert r.usage.completion_tokens == 5 == len(content)
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    again = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=5,
        temperature=0.7,
        seed=3,
        extra_body={
            "top_k": 20,
            "min_p": 0.01,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "min_tokens": 5,
        },
    )
    assert again.choices[0].message.content == r.choices[0].message.content  # same seed, same sample


async def test_50_concurrent_streams(aclient: openai.AsyncOpenAI, reference_llm) -> None:
    prompts = [f"Request number {i} says" for i in range(50)]
    expected = greedy(reference_llm, prompts, 6)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(
            model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    texts = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 240)
    assert texts == expected


async def test_disconnect_mid_stream_aborts_and_frees_blocks(server: ServeProcess) -> None:
    payload = {
        "model": MODEL,
        "prompt": "A long story:",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=60) as http:

        async def start_and_drop() -> None:
            async with http.stream("POST", "/v1/completions", json=payload) as resp:
                assert resp.status_code == 200
                seen = 0
                async for line in resp.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 2:
                        return  # leaving the block closes the connection mid-stream

        generated_before = metric((await http.get("/metrics")).text, "xllm:generation_tokens_total")
        t0 = time.monotonic()
        await asyncio.gather(*(start_and_drop() for _ in range(10)))
        # 10 x 200 tokens would take far longer than this to finish on their own.
        deadline = time.monotonic() + 10
        while True:
            text = (await http.get("/metrics")).text
            used, running = (
                metric(text, "xllm:kv_cache_blocks_used"),
                metric(text, "xllm:num_requests_running"),
            )
            if used == 0 and running == 0:
                break
            assert time.monotonic() < deadline, (
                f"blocks still used after disconnects: used={used} running={running}"
            )
            await asyncio.sleep(0.1)
        assert time.monotonic() - t0 < 20
        # Aborted, not finished: far fewer tokens than the 10 x 200 requested.
        assert metric(text, "xllm:generation_tokens_total") - generated_before < 0.5 * 10 * 200
        assert metric(text, "xllm:kv_cache_blocks_total") > 0
        assert (await http.get("/health")).status_code == 200
        r = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "still alive?", "max_tokens": 2}
        )
        assert r.status_code == 200


def test_metrics_names(server: ServeProcess) -> None:
    text = httpx.get(f"{server.base_url}/metrics").text  # open without the key
    for name in (
        "xllm:num_requests_running",
        "xllm:num_requests_waiting",
        "xllm:kv_cache_usage_perc",
        "xllm:prefix_cache_hit_rate",
        "xllm:prompt_tokens_total",
        "xllm:generation_tokens_total",
        "xllm:kv_cache_blocks_used",
        "xllm:kv_cache_blocks_total",
        "xllm:time_to_first_token_seconds_count",
        "xllm:time_per_output_token_seconds_count",
        "xllm:e2e_request_latency_seconds_count",
    ):
        assert name in text, name
    assert metric(text, "xllm:generation_tokens_total") > 0
    assert metric(text, "xllm:time_to_first_token_seconds_count") > 0


# ---- errors: status and OpenAI error JSON ---------------------------------------------------


def test_401_without_or_with_wrong_key(server: ServeProcess) -> None:
    err = assert_openai_error(httpx.get(f"{server.base_url}/v1/models"), 401)
    assert err["type"] == "authentication_error"
    assert_openai_error(
        httpx.post(
            f"{server.base_url}/v1/completions",
            json={"prompt": "x"},
            headers={"Authorization": "Bearer nope"},
        ),
        401,
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0).models.list()


def test_404_unknown_model(server: ServeProcess, client: openai.OpenAI) -> None:
    err = assert_openai_error(
        httpx.post(
            f"{server.base_url}/v1/chat/completions",
            headers=AUTH,
            json={"model": "gpt-17", "messages": MESSAGES},
        ),
        404,
    )
    assert err["param"] == "model" and err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="x", max_tokens=1)


def test_400_prompt_over_context(server: ServeProcess, client: openai.OpenAI) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/completions",
        headers=AUTH,
        json={"model": MODEL, "prompt": [5] * (MAX_MODEL_LEN + 10), "max_tokens": 1},
    )
    err = assert_openai_error(r, 400)
    assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    r = httpx.post(
        f"{server.base_url}/v1/completions",
        headers=AUTH,
        json={"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN},
    )
    assert assert_openai_error(r, 400)["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 400}])


@pytest.mark.parametrize(
    "path,payload,param",
    [
        ("/v1/chat/completions", {"model": MODEL}, "messages"),  # missing field: FastAPI's 422
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": [10**6]}, "prompt"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "max_tokens": 2, "min_tokens": 5},
            None,
        ),  # engine ValueError
    ],
)
def test_400_invalid_parameters(server: ServeProcess, path: str, payload: dict, param: str | None) -> None:
    err = assert_openai_error(httpx.post(f"{server.base_url}{path}", headers=AUTH, json=payload), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] and err["param"].startswith(param), err


def test_400_malformed_json(server: ServeProcess) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers={**AUTH, "content-type": "application/json"},
        content=b'{"messages": [',
    )
    assert_openai_error(r, 400)


def test_bench_serve_json_has_every_metric(server: ServeProcess, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "xllm",
        "bench",
        "serve",
        "--base-url",
        server.base_url,
        "--num-prompts",
        "6",
        "--max-concurrency",
        "3",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--api-key",
        API_KEY,
        "--slo",
        "ttft_ms=60000,tpot_ms=60000",
        "--json",
        str(out),
        "--seed",
        "1",
        "--endpoint",
        "chat",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Serving Benchmark Result" in proc.stdout and "Mean TTFT (ms):" in proc.stdout
    m = json.loads(out.read_text())
    assert m["completed"] == 6 and m["failed"] == 0
    assert m["total_output_tokens"] == 6 * 4
    for key in (
        "duration",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "total_input_tokens",
    ):
        assert m[key] > 0, key
    for what in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p90", "p99"):
            assert f"{stat}_{what}_ms" in m, (stat, what)
    assert m["mean_ttft_ms"] > 0 and m["mean_e2el_ms"] >= m["mean_ttft_ms"]
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(server: ServeProcess) -> None:
    ids = [(7 * i + 3) % 400 + 11 for i in range(40)]  # a prompt no other test sends
    body = {"model": MODEL, "prompt": ids, "max_tokens": 2}
    usages = [
        httpx.post(f"{server.base_url}/v1/completions", json=body, headers=AUTH, timeout=60).json()["usage"]
        for _ in range(2)
    ]
    assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] == 32  # its two full 16-token blocks

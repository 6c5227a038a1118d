"""A broken device under the server: every client gets an error, /health 503, exit status 1.

The subprocess tests start a real `xllm serve` through fault_launcher.py, which makes the CPU
backend's attention op raise once a marker file exists (the product has no fault switch). With a
fatal fault the engine dies at once; with a persistent ordinary one it dies after
--max-consecutive-step-failures failed steps in a row, instead of failing every request forever
behind a 200 /health (vLLM issue #7633). Either way the in-flight clients get an OpenAI error
(an SSE error event then [DONE] when streaming, 503 JSON otherwise), never a hang, and the
process exits non-zero within seconds so that its supervisor restarts it. The in-process test
checks what the app reports meanwhile (/health, /metrics), which a subprocess shows only briefly.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_process import ServeProcess, assert_openai_error

from xllm import AsyncLLM
from xllm.hal.errors import DeviceFaultError
from xllm.service.app import Phase, ServerConfig, ServerState, create_app

LAUNCHER = Path(__file__).with_name("fault_launcher.py")
EXIT_DEADLINE_S = 10.0  # from the fault to the process gone
CLIENT_TIMEOUT_S = 60.0  # a client that hangs fails the test instead of the suite
LONG = {"prompt": "Tell a long story:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
LONG_CHAT = {
    "messages": [{"role": "user", "content": "Tell a long story."}],
    "max_tokens": 2000,
    "ignore_eos": True,
    "temperature": 0,
}


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def wait_for(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def sse_events(lines: list[str]) -> list[Any]:
    """The JSON payloads of `data:` lines, after checking that [DONE] ends the stream."""
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


class StreamingClient(threading.Thread):
    """POSTs a streaming request and records every `data:` line; `started` is set at the first."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.started = threading.Event()
        self.status: int | None = None
        self.lines: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=CLIENT_TIMEOUT_S) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line)
                        self.started.set()
        except BaseException as exc:  # reported by the test, which joins this thread
            self.error = exc
        finally:
            self.started.set()


class PlainClient(threading.Thread):
    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.response = httpx.post(self.url, json=self.body, timeout=CLIENT_TIMEOUT_S)
        except BaseException as exc:
            self.error = exc


class HealthPoller(threading.Thread):
    """Polls /health until the server stops answering; `statuses` in order."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.statuses: list[int] = []

    def run(self) -> None:
        deadline = time.monotonic() + EXIT_DEADLINE_S + 5
        while time.monotonic() < deadline:
            try:
                self.statuses.append(httpx.get(f"{self.base_url}/health", timeout=2.0).status_code)
            except httpx.HTTPError:
                return  # the listener closed: the server is going away
            time.sleep(0.01)


@pytest.fixture
def start_faulty(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[Callable[..., tuple[ServeProcess, Path]]]:
    """Factory: ``start_faulty("fatal", *args)`` -> (ready server, marker file that arms the fault)."""
    servers: list[ServeProcess] = []

    def start(kind: str, *extra_args: str) -> tuple[ServeProcess, Path]:
        marker = tmp_path / f"fault-{kind}"
        server = ServeProcess(
            tiny_llama_dir,
            "--backend",
            "cpu",
            "--dtype",
            "float32",
            *extra_args,
            log_path=tmp_path / f"serve-{kind}.log",
            launcher=(str(LAUNCHER), str(marker), kind),
        )
        servers.append(server)
        server.wait_ready()
        return server, marker

    yield start
    for server in servers:
        server.stop()


def wait_exit(server: ServeProcess, since: float) -> int:
    """The exit status, which must come within EXIT_DEADLINE_S of `since`."""
    try:
        code = server.proc.wait(max(0.0, since + EXIT_DEADLINE_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"xllm serve still running {EXIT_DEADLINE_S}s after the fault:\n{server.log_tail()}")
    return code


def test_fatal_device_fault_fails_in_flight_clients_and_exits_1(start_faulty) -> None:
    server, marker = start_faulty("fatal", "--max-consecutive-step-failures", "5")
    url = server.base_url
    streaming = StreamingClient(f"{url}/v1/completions", {**LONG, "stream": True})
    plain = PlainClient(f"{url}/v1/chat/completions", LONG_CHAT)
    streaming.start()
    plain.start()
    assert streaming.started.wait(CLIENT_TIMEOUT_S) and streaming.lines, streaming.error
    wait_for(lambda: metric(httpx.get(f"{url}/metrics").text, "xllm:num_requests_running") == 2)
    health = HealthPoller(url)
    fault_at = time.monotonic()
    marker.touch()
    health.start()
    streaming.join(CLIENT_TIMEOUT_S)
    plain.join(CLIENT_TIMEOUT_S)
    assert not streaming.is_alive() and not plain.is_alive(), "a client hung on the dead engine"
    code = wait_exit(server, fault_at)
    health.join(EXIT_DEADLINE_S)
    log = server.log_tail(200_000)

    # The stream had started (200): it ends with an OpenAI error event, then [DONE].
    assert streaming.error is None and streaming.status == 200
    events = sse_events(streaming.lines)
    assert events[0]["choices"], events[0]  # real output before the fault
    assert set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "engine_dead", events[-1]
    # The non-streaming client gets OpenAI's error JSON with a 503.
    assert plain.error is None and plain.response is not None
    assert assert_openai_error(plain.response, 503)["code"] == "engine_dead"
    # /health turned 503 while the process was still up (the poller may miss that short
    # window on a slow machine; then the server's own log line must say why it went away).
    assert 503 in health.statuses or "engine dead (" in log, (health.statuses, log[-3000:])
    assert code == 1, log[-3000:]
    assert len(re.findall(r"engine dead \(.*exit status 1", log)) == 1, log[-3000:]
    assert "DeviceFaultError: injected device fault" in log


def test_persistent_step_failures_stop_the_server_after_k_in_a_row(start_faulty) -> None:
    server, marker = start_faulty("step", "--max-consecutive-step-failures", "2")
    url = server.base_url
    streaming = StreamingClient(f"{url}/v1/completions", {**LONG, "stream": True})
    streaming.start()
    assert streaming.started.wait(CLIENT_TIMEOUT_S) and streaming.lines, streaming.error
    marker.touch()
    streaming.join(CLIENT_TIMEOUT_S)
    assert not streaming.is_alive(), "the streaming client hung"
    # The first failed step fails only its own request (a generic 500 event, as any failed
    # request); the engine is still up and says so.
    events = sse_events(streaming.lines)
    assert set(events[-1]) == {"error"} and events[-1]["error"]["type"] == "server_error", events[-1]
    assert httpx.get(f"{url}/health").status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert metric(metrics, "xllm:num_failed_steps_total") == 1.0
    assert metric(metrics, "xllm:engine_dead") == 0.0
    # The second failure in a row means the device is broken: the engine stops, this client
    # gets a 503 instead of a hang, and the server exits for its supervisor to restart it.
    fault_at = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=CLIENT_TIMEOUT_S)
    assert assert_openai_error(r, 503)["code"] == "engine_dead"
    code = wait_exit(server, fault_at)
    log = server.log_tail(200_000)
    assert code == 1, log[-3000:]
    assert "2 consecutive failed model steps" in log


async def test_dead_engine_in_process_reports_and_refuses(tiny_llama_dir: Path, monkeypatch) -> None:
    """In process, where the short life of a dead server can be inspected at leisure."""
    engine = AsyncLLM(
        model=str(tiny_llama_dir),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory="64MiB",
        max_consecutive_step_failures=5,
    )
    backend = engine.engine.backend
    real_attention = backend._attention
    armed = threading.Event()

    def attention(*args: Any, **kwargs: Any) -> Any:
        if armed.is_set():
            raise DeviceFaultError("injected device fault: device lost")
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(backend, "_attention", attention)
    state = ServerState(ServerConfig(served_model_name="tiny"))
    deaths: list[BaseException] = []
    state.on_engine_dead = deaths.append
    app = create_app(state.config, state=state, engine=engine)
    try:
        async with app.router.lifespan_context(app):
            while state.phase is Phase.LOADING:
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
                # Long enough to be running when the fault comes, within max_model_len 256.
                stream_body = {**LONG, "max_tokens": 200, "stream": True}
                stream = asyncio.create_task(c.post("/v1/completions", json=stream_body))
                plain = asyncio.create_task(
                    c.post("/v1/chat/completions", json={**LONG_CHAT, "max_tokens": 200})
                )
                deadline = time.monotonic() + 30
                while engine.stats().generation_tokens_total < 6:  # both are past their first token
                    assert not (stream.done() or plain.done()), "a request ended before the fault"
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                armed.set()
                streamed, answered = await asyncio.wait_for(asyncio.gather(stream, plain), 10)
                assert streamed.status_code == 200
                lines = [ln for ln in streamed.text.split("\n") if ln.startswith("data: ")]
                assert sse_events(lines)[-1]["error"]["code"] == "engine_dead"
                assert assert_openai_error(answered, 503)["code"] == "engine_dead"
                assert assert_openai_error(await c.get("/health"), 503)["code"] == "engine_dead"
                r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert assert_openai_error(r, 503)["code"] == "engine_dead"
                metrics = (await c.get("/metrics")).text
                assert metric(metrics, "xllm:engine_dead") == 1.0
                assert metric(metrics, "xllm:num_failed_steps_total") == 1.0
                assert metric(metrics, "xllm:kv_cache_blocks_used") == 0.0  # nothing leaked
                deadline = time.monotonic() + 5
                while not deaths:  # the server's exit hook ran, on the event loop
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                assert state.engine_dead_error is deaths[0]
    finally:
        await asyncio.wait_for(engine.shutdown(), 10)

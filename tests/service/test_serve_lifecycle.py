"""Overload and shutdown of a real `xllm serve`: 429 with Retry-After, then a SIGTERM drain.

The server runs one sequence at a time (--max-num-seqs 1) with no waiting room (--max-queue 0):
while one request runs and one waits, the next is refused with 429. The last test sends SIGTERM
and checks the drain: new requests get 503, the in-flight stream still completes, exit status 0.
Tests run in file order and share the module's server; the SIGTERM test consumes it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest
from serve_process import ServeProcess, assert_openai_error

# Long enough (seconds even on a fast CPU) that the checks below happen while it still runs;
# the tests hang up on it rather than wait (it can take a minute on a loaded CPU).
LONG = {"prompt": "Tell a long story:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(start_server) -> ServeProcess:
    return start_server("--max-queue", "0", "--max-num-seqs", "1", "--shutdown-timeout", "300")


def gauge(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, name
    return float(m.group(1))


def wait_for(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


async def test_429_when_queue_is_over_max_queue(server: ServeProcess) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
        # Occupy the single running slot, then make one request wait behind it.
        running = asyncio.create_task(http.post("/v1/completions", json=LONG))
        await asyncio.to_thread(wait_for, lambda: gauge(server.base_url, "xllm:num_requests_running") == 1)
        waiting = asyncio.create_task(http.post("/v1/completions", json={**LONG, "max_tokens": 2}))
        await asyncio.to_thread(wait_for, lambda: gauge(server.base_url, "xllm:num_requests_waiting") >= 1)
        burst = await asyncio.gather(
            *(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) for _ in range(5))
        )
        refused = [r for r in burst if r.status_code == 429]
        assert refused, [r.status_code for r in burst]
        err = assert_openai_error(refused[0], 429)
        assert err["type"] == "rate_limit_error"
        assert int(refused[0].headers["retry-after"]) >= 1
        running.cancel()  # hang up on the long one rather than wait for it; the server aborts it
        await asyncio.gather(running, return_exceptions=True)
        assert (await waiting).status_code == 200  # it waited, then ran once the first was gone
        await asyncio.to_thread(wait_for, lambda: gauge(server.base_url, "xllm:num_requests_running") == 0)
        # Once the queue is empty again the server takes requests.
        assert (await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200


async def test_non_streaming_client_that_gives_up_is_aborted(server: ServeProcess) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
        running = asyncio.create_task(http.post("/v1/completions", json=LONG))
        await asyncio.to_thread(wait_for, lambda: gauge(server.base_url, "xllm:num_requests_running") == 1)
        # This one waits behind the running request (or runs, on a fast machine); its client
        # gives up long before it could finish.
        async with httpx.AsyncClient(base_url=server.base_url, timeout=0.5) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/v1/completions", json=LONG)
        # The server noticed the hang-up and cancelled the request: 499 in the access log, and
        # nothing of it is left waiting in the engine.
        await asyncio.to_thread(
            wait_for, lambda: '"POST /v1/completions" 499' in server.log_tail(100_000), 10
        )
        await asyncio.to_thread(wait_for, lambda: gauge(server.base_url, "xllm:num_requests_waiting") == 0, 5)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await asyncio.to_thread(wait_for, lambda: gauge(server.base_url, "xllm:num_requests_running") == 0)


def test_sigterm_drains_503_then_exits_0(server: ServeProcess) -> None:
    result: dict = {}

    def stream_long() -> None:
        with httpx.stream(
            "POST",
            f"{server.base_url}/v1/completions",
            json={**LONG, "stream": True},
            timeout=120,
        ) as r:
            result["status"] = r.status_code
            result["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=stream_long)
    t.start()
    wait_for(lambda: gauge(server.base_url, "xllm:num_requests_running") == 1)
    server.terminate()
    # Draining: the listener stays up and refuses new work with 503.
    wait_for(lambda: httpx.get(f"{server.base_url}/health").status_code == 503, 10)
    err = assert_openai_error(httpx.get(f"{server.base_url}/health"), 503)
    assert err["code"] == "draining"
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert assert_openai_error(r, 503)["code"] == "draining"
    t.join(120)
    assert result["status"] == 200
    assert result["lines"][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in "".join(result["lines"])  # finished, not aborted
    assert server.proc.wait(60) == 0

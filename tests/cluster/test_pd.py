"""Prefill/decode disaggregation end to end: `xllm cluster up --prefill 1 --decode 1`.

A real router and two real `xllm serve` processes (one per role) on the tiny checkpoint. Every
eligible request is prefilled on one instance, its KV moved over the HAL's TCP transfer engine,
and decoded on the other; the answers must be token-identical to one engine doing everything,
streams must look ordinary, the path must show (headers, metrics), clients that leave mid-way
must leave no KV behind on either side, and switching roles under load must lose nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from pathlib import Path

import httpx
import pytest
from test_cluster_up import ClusterUp

from xllm.cluster.disagg import PREFILL_HEADER
from xllm.cluster.router import INSTANCE_HEADER

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def pd_cluster(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cluster = ClusterUp(
        tiny_llama_dir,
        "embedded",
        tmp_path_factory.mktemp("pd") / "up.log",
        ("--prefill", "1", "--decode", "1"),
    )
    yield cluster
    cluster.stop()


def ragged_prompts() -> list[list[int]]:
    """64 token prompts of 3..150 tokens; every fourth repeats an earlier one's first 48 tokens
    (a prefix-cache hit on both sides) and two are exact repeats."""
    rng = random.Random(7)
    prompts: list[list[int]] = []
    for i in range(64):
        n = rng.randint(3, 150)
        if i % 4 == 3 and prompts:
            base = prompts[rng.randrange(len(prompts))]
            prompts.append(base[:48] + [rng.randrange(10, 500) for _ in range(max(0, n - 48))])
        else:
            prompts.append([rng.randrange(10, 500) for _ in range(n)])
    prompts[10] = list(prompts[2])
    prompts[20] = list(prompts[5])
    return prompts


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> list[list[int]]:
    from xllm import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256)
    outs = llm.generate(
        ragged_prompts(),
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )
    return [o.outputs[0].token_ids for o in outs]


async def completion(
    client: httpx.AsyncClient, url: str, prompt: list[int], stream: bool
) -> tuple[list[int], dict]:
    body = {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"], dict(r.headers)
    ids: list[int] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        headers = dict(r.headers)
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                ids += event["choices"][0].get("token_ids") or []
    return ids, headers


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_pd_answers_are_token_identical_to_one_engine(pd_cluster: ClusterUp, reference) -> None:
    url = pd_cluster.router_url
    prompts = ragged_prompts()

    async def run_all() -> list[tuple[list[int], dict]]:
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(i: int):
                async with sem:
                    return await completion(client, url, prompts[i], stream=i % 2 == 1)

            return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    results = asyncio.run(run_all())
    for i, (ids, headers) in enumerate(results):
        assert ids == reference[i], (i, len(prompts[i]))
        assert headers[INSTANCE_HEADER] == "decode-0" and headers[PREFILL_HEADER] == "prefill-0"
    metrics = httpx.get(f"{url}/metrics").text
    assert (
        metric_value(metrics, "xllm:router_pd_requests_total", prefill="prefill-0", decode="decode-0") == 64
    )
    deadline = time.monotonic() + 10  # instances publish their counters every second
    while (
        metric_value(
            httpx.get(f"{url}/metrics").text, "xllm:instance_kv_transfer_bytes_total", direction="sent"
        )
        <= 0
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status = httpx.get(f"{url}/cluster/instances").json()
    roles = {i["id"]: i["role"] for i in status}
    assert roles == {"prefill-0": "prefill", "decode-0": "decode"}


def instance_urls(url: str) -> dict[str, str]:
    return {i["id"]: i["url"] for i in httpx.get(f"{url}/cluster/instances").json()}


def idle(instance_url: str) -> bool:
    m = httpx.get(f"{instance_url}/metrics").text
    return (
        metric_value(m, "xllm:num_requests_running") == 0
        and metric_value(m, "xllm:kv_cache_blocks_used") == 0
        and metric_value(m, "xllm:kv_holds") == 0
        and metric_value(m, "xllm:kv_receives_pending") == 0
    )


def test_clients_leaving_mid_way_free_kv_on_both_sides_within_5_s(pd_cluster: ClusterUp) -> None:
    url = pd_cluster.router_url
    rng = random.Random(3)

    async def leave(client: httpx.AsyncClient, i: int) -> None:
        prompt = [rng.randrange(10, 500) for _ in range(120)]
        body = {"prompt": prompt, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= i % 4:  # 0: as soon as the answer starts (KV possibly in flight)
                    break

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(leave(client, i) for i in range(8)))

    asyncio.run(run())
    left_at = time.monotonic()
    urls = instance_urls(url)
    while not all(idle(u) for u in urls.values()):
        assert time.monotonic() - left_at < 5.0, {
            k: httpx.get(f"{u}/metrics").text[-600:] for k, u in urls.items()
        }
        time.sleep(0.1)


def test_switching_decode_to_prefill_and_back_under_load_loses_nothing(
    pd_cluster: ClusterUp, reference
) -> None:
    url = pd_cluster.router_url
    prompts = ragged_prompts()[:16]

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [
                asyncio.create_task(completion(client, url, p, stream=i % 2 == 1))
                for i, p in enumerate(prompts)
            ]
            await asyncio.sleep(0.3)
            r = await client.post(f"{url}/cluster/instances/decode-0/role", json={"role": "prefill"})
            assert r.status_code == 200 and r.json()["switched"], r.text
            assert {i["id"]: i["role"] for i in (await client.get(f"{url}/cluster/instances")).json()}[
                "decode-0"
            ] == "prefill"
            r = await client.post(f"{url}/cluster/instances/decode-0/role", json={"role": "decode"})
            assert r.status_code == 200 and r.json()["switched"], r.text
            return [ids for ids, _ in await asyncio.gather(*streams)]

    got = asyncio.run(run())
    assert got == reference[:16]  # 8 streams and 8 whole answers, none lost, none changed
    metrics = httpx.get(f"{url}/metrics").text
    assert metric_value(metrics, "xllm:router_role_switches_total", instance="decode-0") == 2
    role = httpx.get(f"{instance_urls(url)['decode-0']}/cluster/role").json()
    assert role == {"id": "decode-0", "role": "decode"}
    out = re.sub(r"\s+", " ", httpx.get(f"{url}/cluster/instances").text)
    assert '"role":"decode"' in out.replace(" ", "")


def test_bench_serve_pd_workload_compares_pd_with_all_mixed(pd_cluster: ClusterUp, tmp_path) -> None:
    from xllm.cli.main import main as cli_main

    url = pd_cluster.router_url
    out = tmp_path / "pd.json"
    args = [
        "bench",
        "serve",
        "--base-url",
        url,
        "--workload",
        "pd",
        "--num-prompts",
        "6",
        "--max-concurrency",
        "3",
    ]
    args += [
        "--input-len",
        "24",
        "--output-len",
        "6",
        "--slo",
        "ttft_ms=60000,tpot_ms=60000",
        "--json",
        str(out),
    ]
    assert cli_main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["run"] for r in runs] == ["prefill/decode", "all mixed"]
    assert all(r["completed"] == 6 and r["request_goodput"] > 0 and r["p99_tpot_ms"] > 0 for r in runs)
    # The roles are back, and the split path served the first run.
    assert {i["id"]: i["role"] for i in httpx.get(f"{url}/cluster/instances").json()} == {
        "prefill-0": "prefill",
        "decode-0": "decode",
    }

"""Async scheduling: step N+1 is scheduled while step N runs, and nothing a caller sees changes.

The synchronous engine is the reference: the same requests give the same tokens, text, finish
reasons and logprobs. The cases that only async scheduling has: a request finishing (stop token,
stop string, max_tokens) while the step after it is already scheduled, an abort while its step
runs on the step thread, and a step that fails there. Every engine is checked idle at the end (no
request, no KV block left; see conftest).
"""

from __future__ import annotations

import random

import pytest

from xllm import SamplingParams
from xllm.engine.config import EngineConfig
from xllm.engine.llm_engine import PLACEHOLDER_TOKEN


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(rng.randint(3, 50))] for _ in range(n)]


def _outputs(llm, prompts, params):
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
        for o in llm.generate(prompts, params, use_tqdm=False)
    ]


def test_stops_that_land_while_the_next_step_is_scheduled_end_as_in_the_sync_engine(make_llm, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = _prompts(8, seed=4)
    free_run = make_llm().generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True), use_tqdm=False
    )
    first = free_run[0].outputs[0]
    # A stop token and a stop string the output really emits, so requests end mid-batch.
    stop_id = first.token_ids[9]
    stop_str = tok.decode(free_run[1].outputs[0].token_ids[12:14])
    assert stop_str.strip(), "the stop string case lost its point"
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_id], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, stop=[stop_str], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.0, max_tokens=7, logprobs=2),
        SamplingParams(temperature=0.9, seed=3, max_tokens=25, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, min_tokens=5),
        SamplingParams(temperature=0.7, seed=8, max_tokens=15, n=3),
        SamplingParams(temperature=0.0, max_tokens=20, prompt_logprobs=1),
    ]
    sync = make_llm()
    want = _outputs(sync, prompts, params)
    asynced = make_llm(async_scheduling=True)
    got = _outputs(asynced, prompts, params)
    assert got == want
    assert [o[0][2] for o in want[:3]] == ["stop", "stop", "length"]  # the stops did land
    assert asynced.engine._in_flight is None


def test_a_single_stream_decodes_the_same_tokens_step_after_step(make_llm) -> None:
    prompt = _prompts(1, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    assert _outputs(make_llm(async_scheduling=True), prompt, params) == _outputs(make_llm(), prompt, params)


def test_abort_while_its_step_runs_frees_everything_and_leaves_no_placeholder(make_llm) -> None:
    llm = make_llm(async_scheduling=True)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = _prompts(3, seed=2)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None  # a step runs now, sampling for r1 among others
    seq = engine.requests["r1"].seqs[0]
    assert seq.token_ids[-1] == PLACEHOLDER_TOKEN and seq.num_pending == 1
    aborted = engine.abort_request("r1")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert PLACEHOLDER_TOKEN not in aborted.outputs[0].token_ids
    assert PLACEHOLDER_TOKEN not in seq.token_ids and not seq.block_table
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert sorted(finished) == ["r0", "r2"]
    reference = make_llm().generate([prompts[0], prompts[2]], params, use_tqdm=False)
    assert [finished["r0"], finished["r2"]] == [o.outputs[0].token_ids for o in reference]


def test_a_step_failing_on_the_step_thread_fails_its_requests_and_the_engine_serves_on(make_llm, monkeypatch):
    llm = make_llm(async_scheduling=True, use_graphs=False)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    real = engine.runner.execute_prepared
    calls = {"n": 0}

    def fail_the_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected step failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute_prepared", fail_the_fourth)
    prompts = _prompts(2, seed=5)
    with pytest.raises(RuntimeError, match=r"2 request\(s\) failed: RuntimeError: injected step failure"):
        llm.generate(prompts, params, use_tqdm=False)
    assert engine.stats().num_failed_steps == 1
    assert not engine.requests and engine.kv_cache.num_used_blocks == 0 and engine._in_flight is None
    # The engine is alive and its next requests decode exactly as the sync engine's.
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [
        o.outputs[0].token_ids for o in make_llm().generate(prompts, params, use_tqdm=False)
    ]


@pytest.mark.parametrize(
    "other",
    [{"num_speculative_tokens": 2}, {"tensor_parallel_size": 2}],
    ids=["speculative", "tensor-parallel"],
)
def test_async_scheduling_refuses_what_it_cannot_overlap(other) -> None:
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling=True, **other)


async def test_async_llm_streams_the_sync_tokens_and_an_abort_mid_stream_frees_all(make_llm, tiny_llama_dir):
    import asyncio

    from xllm import AsyncLLM

    prompts = _prompts(2, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    want = make_llm().generate(prompts, params, use_tqdm=False)
    engine = AsyncLLM(
        model=str(tiny_llama_dir), dtype="float32", kv_cache_memory="16MiB", async_scheduling=True
    )
    try:

        async def stream(i: int, abort_after: int | None) -> list:
            outs = []
            async for out in engine.generate(prompts[i], params, f"s{i}"):
                assert PLACEHOLDER_TOKEN not in out.outputs[0].token_ids
                outs.append(out)
                if abort_after is not None and len(outs) == abort_after:
                    await engine.abort(f"s{i}")
            return outs

        kept, aborted = await asyncio.gather(stream(0, None), stream(1, 3))
        assert kept[-1].outputs[0].token_ids == want[0].outputs[0].token_ids
        assert aborted[-1].outputs[0].finish_reason == "abort"
        got = aborted[-1].outputs[0].token_ids
        assert got == want[1].outputs[0].token_ids[: len(got)]
        core = engine.engine
        for _ in range(200):  # the loop thread finishes the step that was running at the abort
            if not core.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        assert not core.requests and core.kv_cache.num_used_blocks == 0 and core._in_flight is None
    finally:
        await engine.shutdown()

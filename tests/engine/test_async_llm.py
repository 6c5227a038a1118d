"""`AsyncLLM` as the server drives it: streaming, aborts, disconnects, rejections, stats, failures."""

from __future__ import annotations

import asyncio
import time

import pytest

from xllm import AsyncLLM, SamplingParams
from xllm.engine.errors import EngineDeadError, PromptTooLongError

PROMPTS = [[10, 20, 30, 40, 50], list(range(100, 140)), [7]]


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture
def new_engine(tiny_llama_dir, kv_bytes):
    """Factory for AsyncLLMs over the tiny Llama with 128 float32 KV blocks; the test shuts them down."""

    def make(**kw) -> AsyncLLM:
        kw.setdefault("kv_cache_memory", kv_bytes(tiny_llama_dir, 128))
        return AsyncLLM(model=str(tiny_llama_dir), dtype="float32", **kw)

    return make


async def wait_idle(engine: AsyncLLM, timeout_s: float = 10.0) -> None:
    """Waits for the loop thread to drain; fails if a request or a KV block is left behind."""
    core = engine.engine
    deadline = time.monotonic() + timeout_s
    while core.requests or core.kv_cache.num_used_blocks:
        if time.monotonic() > deadline:
            pytest.fail(
                f"engine not idle: requests {list(core.requests)}, {core.kv_cache.num_used_blocks} blocks used"
            )
        await asyncio.sleep(0.01)
    assert core.scheduler.num_running == 0 and core.scheduler.num_waiting == 0


@pytest.fixture
async def engine(new_engine):
    eng = new_engine()
    try:
        yield eng
        await wait_idle(eng)
    finally:
        await eng.shutdown()


async def collect(engine: AsyncLLM, prompt, params, rid: str) -> list:
    return [out async for out in engine.generate(prompt, params, rid)]


async def test_streaming_is_cumulative_and_matches_llm_generate(engine, make_llm):
    params = greedy(10)
    streams = await asyncio.gather(*(collect(engine, p, params, f"s{i}") for i, p in enumerate(PROMPTS)))
    want = make_llm().generate(PROMPTS, params, use_tqdm=False)
    for outs, ref in zip(streams, want, strict=True):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        for prev, cur in zip(outs[:-1], outs[1:], strict=True):
            assert cur.outputs[0].token_ids[: len(prev.outputs[0].token_ids)] == prev.outputs[0].token_ids
            assert cur.outputs[0].text.startswith(prev.outputs[0].text)
        last = outs[-1].outputs[0]
        assert last.token_ids == ref.outputs[0].token_ids and last.text == ref.outputs[0].text
        assert last.finish_reason == "length"
    stats = engine.stats()
    assert stats.prompt_tokens_total == sum(map(len, PROMPTS))
    assert stats.generation_tokens_total == 10 * len(PROMPTS)


async def test_abort_mid_stream(engine):
    outs = []
    async for out in engine.generate(PROMPTS[1], greedy(500), "long"):
        outs.append(out)
        if len(outs) == 3:
            await engine.abort("long")
    last = outs[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert 3 <= len(last.outputs[0].token_ids) < 500
    await wait_idle(engine)
    await engine.abort("long")  # aborting a finished or unknown request is harmless
    await engine.abort("never-existed")


async def test_closing_the_stream_early_frees_its_blocks(engine):
    agen = engine.generate(PROMPTS[1], greedy(500, n=2), "gone")
    first = await agen.__anext__()
    await agen.__anext__()
    assert not first.finished and engine.engine.kv_cache.num_used_blocks > 0
    await agen.aclose()  # what a server does when the client disconnects
    await wait_idle(engine)


async def test_cancelled_consumer_frees_its_blocks(engine):
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(PROMPTS[1], greedy(500), "cancelled"):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine)


async def test_rejected_request_raises_without_affecting_others(engine):
    params = greedy(12)
    good = asyncio.create_task(collect(engine, PROMPTS[0], params, "good"))
    with pytest.raises(PromptTooLongError):
        await collect(engine, [5 + i % 500 for i in range(engine.max_model_len + 1)], params, "too-long")
    with pytest.raises(ValueError):
        await collect(engine, [10, 99999], params, "out-of-vocab")
    with pytest.raises(ValueError):
        await collect(engine, "", params, "empty")
    outs = await good
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert len(outs[-1].outputs[0].token_ids) == 12


async def test_duplicate_request_id_does_not_hijack_the_running_stream(engine):
    first = engine.generate(PROMPTS[1], greedy(30), "same")
    out = await first.__anext__()
    with pytest.raises(ValueError, match="same"):
        await collect(engine, PROMPTS[0], greedy(30), "same")
    outs = [out] + [o async for o in first]
    last = outs[-1]
    assert last.finished and last.outputs[0].finish_reason == "length"
    assert last.prompt_token_ids == PROMPTS[1] and len(last.outputs[0].token_ids) == 30


async def test_request_id_is_free_once_its_last_output_is_out(engine):
    # A caller that stops at the finished output without resuming the generator (so it never
    # returns) may reuse the id at once; the old generator's clean-up must not touch the new one.
    old = engine.generate(PROMPTS[0], greedy(3), "reused")
    while not (await old.__anext__()).finished:
        pass
    outs = await collect(engine, PROMPTS[2], greedy(4), "reused")
    assert outs[-1].prompt_token_ids == PROMPTS[2] and len(outs[-1].outputs[0].token_ids) == 4
    new = engine.generate(PROMPTS[1], greedy(5), "reused")
    await new.__anext__()
    await old.aclose()
    rest = [o async for o in new]
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "length"


async def test_stats_report_running_waiting_and_blocks(new_engine):
    engine = new_engine(max_num_seqs=1)
    try:
        idle = engine.stats()
        assert (idle.num_running, idle.num_waiting, idle.kv_blocks_used, idle.kv_blocks_total) == (
            0,
            0,
            0,
            128,
        )
        seen = []

        async def watch(rid, prompt, max_tokens):
            async for _ in engine.generate(prompt, greedy(max_tokens), rid):
                seen.append(engine.stats())

        # "a" runs long enough (tens of steps) for its outputs to find "b" waiting for the seat
        # even when a step takes a millisecond.
        await asyncio.gather(watch("a", PROMPTS[1], 48), watch("b", PROMPTS[0], 6))
        assert any(s.num_running == 1 and s.num_waiting == 1 and s.kv_blocks_used >= 3 for s in seen)
        assert all(s.num_running <= 1 for s in seen)
        await wait_idle(engine)
        done = engine.stats()
        assert (done.num_running, done.num_waiting, done.kv_blocks_used) == (0, 0, 0)
        assert done.generation_tokens_total == 54 and 0.0 <= done.kv_cache_usage <= 1.0
    finally:
        await engine.shutdown()


async def test_loop_survives_a_failing_step(engine, monkeypatch):
    runner = engine.engine.runner
    real_execute = runner.execute
    fail = {"armed": False}

    def flaky_execute(scheduled):
        if fail["armed"]:
            fail["armed"] = False
            raise RuntimeError("injected device fault")
        return real_execute(scheduled)

    monkeypatch.setattr(runner, "execute", flaky_execute)
    outs = []
    async for out in engine.generate(PROMPTS[1], greedy(200), "victim"):
        outs.append(out)
        if len(outs) == 2:
            fail["armed"] = True
    last = outs[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert last.error and "injected device fault" in last.error
    await wait_idle(engine)
    assert engine.is_running and not engine.errored
    after = await collect(engine, PROMPTS[0], greedy(6), "after")
    assert after[-1].outputs[0].finish_reason == "length" and not after[-1].error


async def test_shutdown_ends_open_streams(new_engine):
    engine = new_engine()
    agen = engine.generate(PROMPTS[1], greedy(100000), "open")
    await agen.__anext__()
    await engine.shutdown()
    with pytest.raises(EngineDeadError):
        await collect(engine, PROMPTS[0], greedy(), "late")

    async def rest():
        return [o async for o in agen]

    try:
        outs = await asyncio.wait_for(rest(), 10)
    except EngineDeadError:
        pass  # ending with an error is fine too; hanging is not
    else:
        assert outs and outs[-1].finished

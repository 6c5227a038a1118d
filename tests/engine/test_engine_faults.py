"""Engine faults: failing model steps, fatal device errors, a dead loop, and what every caller sees.

Faults are injected by wrapping the real CPU backend's attention op (or the engine's step) from
the test; production code has no fault switch. Every wait is bounded (``asyncio.wait_for``) so a
regression that hangs a caller fails here instead of hanging the suite. Each test also checks
that a dead engine leaves no request and no KV block behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from xllm import AsyncLLM, SamplingParams
from xllm.engine.errors import EngineDeadError
from xllm.hal.errors import DeviceFaultError

PROMPT = list(range(100, 140))
WAIT_S = 5.0  # generous for a tiny model on a loaded CPU; a hang shows up as a timeout


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


class AttentionFault:
    """Stands in for a backend's ``_attention``: raises ``make_error()`` while armed, else runs the
    real op. The first attention layer of a step raises, so each armed step fails exactly once."""

    def __init__(self, backend: object, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = backend._attention  # type: ignore[attr-defined]
        self.make_error: Callable[[], Exception] | None = None
        self.once = False
        self.raised = 0
        monkeypatch.setattr(backend, "_attention", self)

    def arm(self, make_error: Callable[[], Exception], once: bool = False) -> None:
        self.make_error, self.once = make_error, once

    def __call__(self, *args: object, **kwargs: object) -> object:
        make_error = self.make_error
        if make_error is None:
            return self.real(*args, **kwargs)
        if self.once:
            self.make_error = None
        self.raised += 1
        raise make_error()


def assert_no_leak(core) -> None:
    assert not core.requests, f"requests left in the dead engine: {list(core.requests)}"
    assert core.scheduler.num_running == 0 and core.scheduler.num_waiting == 0
    assert core.kv_cache.num_used_blocks == 0, f"{core.kv_cache.num_used_blocks} KV blocks leaked"


async def wait_until(cond: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.01)


async def collect(engine: AsyncLLM, rid: str, max_tokens: int = 6) -> list:
    return [out async for out in engine.generate(PROMPT, greedy(max_tokens), rid)]


@pytest.fixture
async def new_engine(tiny_llama_dir, kv_bytes):
    """Factory for AsyncLLMs over the tiny Llama (128 float32 KV blocks), shut down at teardown."""
    built: list[AsyncLLM] = []

    def make(**kw: object) -> AsyncLLM:
        kw.setdefault("kv_cache_memory", kv_bytes(tiny_llama_dir, 128))
        engine = AsyncLLM(model=str(tiny_llama_dir), dtype="float32", **kw)
        built.append(engine)
        return engine

    yield make
    for engine in built:
        await asyncio.wait_for(engine.shutdown(), 2 * WAIT_S)  # a dead loop must not block it


# ---------------------------------------------------------------------------------------- async


@pytest.mark.parametrize("kind", ["device_fault_error", "backend_classifies"])
async def test_fatal_error_kills_the_engine_on_the_first_failure(new_engine, monkeypatch, kind):
    engine = new_engine(max_num_seqs=2, max_consecutive_step_failures=5)
    backend = engine.engine.backend
    fault = AttentionFault(backend, monkeypatch)
    if kind == "device_fault_error":
        make_error: Callable[[], Exception] = lambda: DeviceFaultError("injected: device lost")  # noqa: E731
    else:
        # Any exception the backend calls fatal; the engine asks the backend, never guesses.
        monkeypatch.setattr(backend, "is_fatal_error", lambda exc: "uncorrectable ECC" in str(exc))
        make_error = lambda: RuntimeError("injected: uncorrectable ECC error encountered")  # noqa: E731
    # Two requests run, a third waits for a slot: all three must end when the device dies.
    tasks = [asyncio.create_task(collect(engine, f"r{i}", max_tokens=100_000)) for i in range(3)]
    await wait_until(lambda: engine.stats().num_running == 2 and engine.stats().num_waiting == 1)
    fault.arm(make_error)
    for task in tasks:
        with pytest.raises(EngineDeadError, match="injected"):
            await asyncio.wait_for(task, WAIT_S)
    assert fault.raised == 1, "the engine must stop at the first fatal failure"
    assert engine.errored
    await wait_until(lambda: not engine.is_running)  # the loop thread ends after answering
    assert engine.stats().num_failed_steps == 1
    # Later callers fail at once, and aborts (a client disconnect, the drain) return.
    with pytest.raises(EngineDeadError, match="injected"):
        await asyncio.wait_for(collect(engine, "late"), WAIT_S)
    await asyncio.wait_for(engine.abort("r0"), WAIT_S)
    assert_no_leak(engine.engine)


async def test_k_consecutive_failures_kill_the_engine(new_engine, monkeypatch):
    engine = new_engine(max_consecutive_step_failures=3)
    fault = AttentionFault(engine.engine.backend, monkeypatch)
    fault.arm(lambda: RuntimeError("injected step fault"))  # not fatal by itself, but persistent
    for i in range(2):
        outs = await asyncio.wait_for(collect(engine, f"failed{i}"), WAIT_S)
        # Below the limit a failing step fails its own requests only; the engine serves on.
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert outs[-1].error and "injected step fault" in outs[-1].error
        assert not engine.errored
    with pytest.raises(EngineDeadError, match="3 consecutive") as info:
        await asyncio.wait_for(collect(engine, "third"), WAIT_S)
    assert "injected step fault" in str(info.value)
    assert engine.errored and engine.stats().num_failed_steps == 3
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(collect(engine, "late"), WAIT_S)
    assert_no_leak(engine.engine)


async def test_isolated_failures_between_successes_do_not_kill(new_engine, monkeypatch):
    engine = new_engine(max_consecutive_step_failures=2)
    fault = AttentionFault(engine.engine.backend, monkeypatch)
    for i in range(3):
        fault.arm(lambda: RuntimeError("injected one-off fault"), once=True)
        bad = await asyncio.wait_for(collect(engine, f"bad{i}"), WAIT_S)
        assert bad[-1].error and "injected one-off fault" in bad[-1].error
        # A successful step resets the count, so two failures in all never reach the limit of 2.
        good = await asyncio.wait_for(collect(engine, f"good{i}"), WAIT_S)
        assert good[-1].outputs[0].finish_reason == "length" and not good[-1].error
    assert engine.is_running and not engine.errored
    assert engine.stats().num_failed_steps == 3
    await wait_until(lambda: not engine.engine.requests)
    assert_no_leak(engine.engine)


async def test_queued_commands_are_answered_when_the_loop_dies(new_engine, monkeypatch):
    engine = new_engine()
    core = engine.engine
    in_step, release = threading.Event(), threading.Event()

    def stuck_then_broken_step() -> list:
        in_step.set()
        release.wait(WAIT_S)
        raise RuntimeError("injected engine-loop fault")

    monkeypatch.setattr(core, "step", stuck_then_broken_step)
    victim = asyncio.create_task(collect(engine, "victim"))
    assert await asyncio.to_thread(in_step.wait, WAIT_S)
    # The loop thread is inside step(): these commands wait in its queue when it dies.
    queued = [asyncio.create_task(collect(engine, f"queued{i}")) for i in range(2)]
    aborts = [asyncio.create_task(engine.abort(rid)) for rid in ("victim", "queued0", "unknown")]
    await asyncio.sleep(0.1)
    release.set()
    for task in [victim, *queued]:
        with pytest.raises(EngineDeadError, match="injected engine-loop fault"):
            await asyncio.wait_for(task, WAIT_S)
    await asyncio.wait_for(asyncio.gather(*aborts), WAIT_S)
    assert engine.errored
    await wait_until(lambda: not core.requests)  # the dead loop frees what it held
    assert_no_leak(core)


async def test_commands_sent_after_the_loop_died_are_answered(new_engine, monkeypatch):
    engine = new_engine()
    fault = AttentionFault(engine.engine.backend, monkeypatch)
    fault.arm(lambda: DeviceFaultError("injected: device lost"))
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(collect(engine, "first"), WAIT_S)
    await wait_until(lambda: not engine.is_running)
    await asyncio.wait_for(engine.abort("first"), WAIT_S)
    await asyncio.wait_for(engine.abort("never-existed"), WAIT_S)
    # The race: a caller that passed the liveness check just before the loop died still sends
    # its command; it must be refused, not left in a queue nobody drains.
    monkeypatch.setattr(engine, "_check_alive", lambda: None)
    with pytest.raises(EngineDeadError, match="injected"):
        await asyncio.wait_for(collect(engine, "racer"), WAIT_S)
    assert_no_leak(engine.engine)


async def test_abort_before_the_loop_started_returns(new_engine):
    engine = new_engine()
    await asyncio.wait_for(engine.abort("nothing-yet"), WAIT_S)


# ---------------------------------------------------------------------------------------- offline


def test_llm_generate_raises_when_a_fatal_fault_kills_the_engine(make_llm, monkeypatch):
    llm = make_llm()
    fault = AttentionFault(llm.engine.backend, monkeypatch)
    fault.arm(lambda: DeviceFaultError("injected: device lost"))
    with pytest.raises(EngineDeadError, match="injected"):
        llm.generate([PROMPT, [7, 8, 9]], greedy(), use_tqdm=False)
    fault.make_error = None  # even once the device "works" again the engine stays dead
    with pytest.raises(EngineDeadError, match="injected"):
        llm.generate(PROMPT, greedy(), use_tqdm=False)
    # make_llm checks at teardown that no request and no KV block is left.


def test_llm_generate_raises_after_k_consecutive_failures(make_llm, monkeypatch):
    llm = make_llm(max_consecutive_step_failures=2)
    fault = AttentionFault(llm.engine.backend, monkeypatch)
    fault.arm(lambda: RuntimeError("injected step fault"))
    with pytest.raises(RuntimeError, match="request\\(s\\) failed") as first:
        llm.generate(PROMPT, greedy(), use_tqdm=False)
    assert not isinstance(first.value, EngineDeadError)
    with pytest.raises(EngineDeadError, match="2 consecutive"):
        llm.generate(PROMPT, greedy(), use_tqdm=False)
    assert llm.engine.stats().num_failed_steps == 2

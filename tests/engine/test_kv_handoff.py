"""Prefill/decode hand-off between two engines over the HAL's TCP KV transfer.

Two `LLM`s on the tiny checkpoint stand for a prefill and a decode instance (separate caches,
separate transfer engines on loopback sockets). The prefill engine computes the prompt and its
first token and holds the prompt's KV; the decode engine receives it and decodes the rest. The
output must be token-identical to one engine doing everything, with and without prefix-cache
hits on either side; a failed transfer falls back to a local prefill; nothing leaks.
"""

from __future__ import annotations

import time

import pytest

from xllm import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


class EngineSource:
    """The `KVSource` the service implements over HTTP, here a direct call into the prefill engine."""

    def __init__(self, prefill_engine, fail: str | None = None, transfer_id: str = "") -> None:
        self.engine = prefill_engine
        self.transfer_id = transfer_id
        self.fail = fail
        self.asked: list[tuple[int, int]] = []

    def request_send(self, destination: str, first_block: int, num_tokens: int) -> None:
        self.asked.append((first_block, num_tokens))
        if self.fail:
            raise RuntimeError(self.fail)
        self.engine.handoff.send_held(self.transfer_id, destination, first_block, num_tokens)

    def describe(self) -> str:
        return "the test's prefill engine"


def run(engine, request_id: str, prompt, params: SamplingParams):
    engine.add_request(request_id, prompt, params)
    last = None
    deadline = time.monotonic() + 60
    while request_id in engine.requests:
        assert time.monotonic() < deadline
        for out in engine.step():
            if out.request_id == request_id:
                last = out
    return last


def prefill_then_decode(prefill, decode, rid: str, prompt: list[int], params=PARAMS, source=None):
    first = run(
        prefill.engine,
        rid,
        {"prompt_token_ids": prompt, "kv_hold": True},
        params.model_copy(update={"max_tokens": 1}),
    )
    assert first.kv_transfer_params is not None
    assert first.kv_transfer_params["num_tokens"] == len(prompt)
    source = source or EngineSource(prefill.engine)
    source.transfer_id = first.kv_transfer_params["transfer_id"]
    out = run(
        decode.engine,
        f"decode-{rid}",
        {"prompt_token_ids": prompt, "resume_token_ids": first.outputs[0].token_ids, "kv_source": source},
        params,
    )
    return out, source


def drain_holds(engine) -> None:
    deadline = time.monotonic() + 10
    while engine.handoff.has_work():
        assert time.monotonic() < deadline, engine.handoff.held
        engine.step()


@pytest.fixture
def pair(make_llm):
    return make_llm(), make_llm()


@pytest.mark.parametrize("length", [5, 16, 37, 64])
def test_decode_after_handoff_equals_one_engine(pair, make_llm, length: int) -> None:
    prefill, decode = pair
    prompt = [(13 * i + 7) % 480 + 10 for i in range(length)]
    whole = make_llm().generate([prompt], PARAMS, use_tqdm=False)[0].outputs[0]
    out, source = prefill_then_decode(prefill, decode, "r1", prompt)
    assert out.outputs[0].token_ids == whole.token_ids and out.outputs[0].text == whole.text
    assert source.asked == [(0, length)]  # the whole prompt came over
    # The sending thread may still be finishing when the decode side is done: the hold ends after.
    drain_holds(prefill.engine)
    assert decode.engine.handoff.stats.receives == 1 and prefill.engine.handoff.stats.sends == 1
    # Again with the same prompt: the decode side's prefix cache has its full blocks, so only the
    # tail moves (or nothing, when the prompt is whole blocks).
    out2, source2 = prefill_then_decode(prefill, decode, "r2", prompt)
    assert out2.outputs[0].token_ids == whole.token_ids
    full = (length // 16) * 16
    if full == length:
        assert source2.asked == []
    else:
        assert source2.asked == [(full // 16, length - full)]
    drain_holds(prefill.engine)  # the hold nobody asked for (whole-block prompt) expires


def test_a_failed_transfer_falls_back_to_a_local_prefill(pair, make_llm) -> None:
    prefill, decode = pair
    prompt = list(range(40, 90))
    whole = make_llm().generate([prompt], PARAMS, use_tqdm=False)[0].outputs[0]
    source = EngineSource(prefill.engine, fail="connection refused by the test")
    out, _ = prefill_then_decode(prefill, decode, "r1", prompt, source=source)
    assert out.outputs[0].token_ids == whole.token_ids
    assert decode.engine.handoff.stats.failures["cancelled"] == 1
    drain_holds(prefill.engine)
    assert prefill.engine.handoff.stats.holds_expired == 1


def test_abort_while_receiving_frees_every_block(pair) -> None:
    prefill, decode = pair

    class NeverSends(EngineSource):
        def request_send(self, *args) -> None:
            time.sleep(0.2)  # the holder is slow; the client leaves first

    prompt = list(range(100, 150))
    run(
        prefill.engine,
        "r1",
        {"prompt_token_ids": prompt, "kv_hold": True},
        PARAMS.model_copy(update={"max_tokens": 1}),
    )
    decode.engine.add_request(
        "r1",
        {"prompt_token_ids": prompt, "resume_token_ids": [5], "kv_source": NeverSends(prefill.engine)},
        PARAMS,
    )
    assert decode.engine.kv_cache.num_used_blocks > 0 and decode.engine.handoff.receiving
    decode.engine.abort_request("r1")
    assert decode.engine.kv_cache.num_used_blocks == 0 and not decode.engine.handoff.receiving
    drain_holds(prefill.engine)
    assert prefill.engine.kv_cache.num_used_blocks == 0


def test_handoff_options_are_checked(pair) -> None:
    _, decode = pair
    with pytest.raises(ValueError, match="resume_token_ids"):
        decode.engine.add_request("x", {"prompt_token_ids": [1, 2], "kv_source": EngineSource(None)}, PARAMS)
    with pytest.raises(ValueError, match="n = 1"):
        decode.engine.add_request(
            "x", {"prompt_token_ids": [1, 2], "kv_hold": True}, PARAMS.model_copy(update={"n": 2})
        )
    assert not decode.engine.requests


def test_received_requests_wait_for_a_seat(make_llm) -> None:
    prefill, decode = make_llm(), make_llm(max_num_seqs=1)
    prompts = [[(7 * i + j) % 400 + 20 for j in range(30)] for i in range(3)]
    firsts = [
        run(
            prefill.engine,
            f"p{i}",
            {"prompt_token_ids": p, "kv_hold": True},
            PARAMS.model_copy(update={"max_tokens": 1}),
        )
        for i, p in enumerate(prompts)
    ]
    for i, (p, first) in enumerate(zip(prompts, firsts, strict=True)):
        source = EngineSource(prefill.engine, transfer_id=first.kv_transfer_params["transfer_id"])
        decode.engine.add_request(
            f"d{i}",
            {"prompt_token_ids": p, "resume_token_ids": first.outputs[0].token_ids, "kv_source": source},
            PARAMS,
        )
    finished = []
    deadline = time.monotonic() + 60
    while decode.engine.requests:
        assert time.monotonic() < deadline
        assert decode.engine.scheduler.num_running <= 1
        finished += [o.request_id for o in decode.engine.step() if o.finished]
    assert sorted(finished) == ["d0", "d1", "d2"]
    drain_holds(prefill.engine)

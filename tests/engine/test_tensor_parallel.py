"""Tensor parallelism on the CPU: two worker processes over gloo must decode what one process does.

Greedy float32 output at TP=2 equals TP=1 token for token on every family (a ragged batch, with
logprobs close), a padded vocabulary (not a multiple of N) is gathered back whole, a killed
worker stops the engine with an error naming its rank (no hang), and a TP size that does not
divide the heads is refused in one line before any process starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from xllm import LLM, SamplingParams
from xllm.engine.async_llm import AsyncLLM
from xllm.engine.errors import EngineDeadError
from xllm.engine.tp import WorkerStepError
from xllm.models import ModelConfig
from xllm.models.layers import Int8Weight
from xllm.models.loader import weight_files
from xllm.models.parallel import TensorParallelError, read_shard_tensors

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 60)), [3], list(range(100, 117))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)
KW = {"backend": "cpu", "dtype": "float32", "block_size": 16, "kv_cache_memory": "4MiB"}


def _generate(llm: LLM, prompts: list[list[int]]) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)


def _close_logprobs(a: list, b: list) -> None:
    for la, lb in zip(a, b, strict=True):
        assert (la is None) == (lb is None)
        if la is None:
            continue
        assert la.keys() == lb.keys()
        for t in la:
            assert lb[t].logprob == pytest.approx(la[t].logprob, abs=1e-4)


def _close(llm: LLM) -> None:
    llm.engine.model.close()


def _check_same(path: Path, prompts: list[list[int]]) -> None:
    one = _generate(LLM(model=str(path), **KW), prompts)
    llm = LLM(model=str(path), tensor_parallel_size=2, **KW)
    try:
        two = _generate(llm, prompts)
    finally:
        _close(llm)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]
    for a, b in zip(one, two, strict=True):
        _close_logprobs(a.outputs[0].logprobs, b.outputs[0].logprobs)
        _close_logprobs(a.prompt_logprobs, b.prompt_logprobs)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_greedy_equals_tp1(family: str, tiny_model_dir) -> None:
    _check_same(tiny_model_dir(family), PROMPTS)


def _odd_vocab_copy(src: Path, dst: Path, vocab: int) -> Path:
    """`src` with its vocabulary cut to `vocab` rows (config and matrices; the tokenizer keeps
    its ids, which the engine tolerates beyond the logits)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = vocab
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in weight_files(dst):
        tensors = load_file(f)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:
                tensors[name] = tensors[name][:vocab].contiguous()
        save_file(tensors, f, metadata={"format": "pt"})
    return dst


def test_tp2_padded_vocab(tiny_model_dir, tmp_path: Path) -> None:
    # 509 = 2 * 255 - 1: rank 1's last head row is padding, which must never be sampled.
    path = _odd_vocab_copy(tiny_model_dir("llama"), tmp_path / "odd", 509)
    _check_same(path, PROMPTS[:2])


def test_shards_read_only_their_slice(tiny_model_dir) -> None:
    """Three ranks' slices of a tiny checkpoint put back together are the checkpoint (vocab 512
    over 3 ranks: 171 rows each, one zero row of padding on the last)."""
    from safetensors.torch import load_file

    path = tiny_model_dir("llama")
    files = weight_files(path)
    config = ModelConfig.from_pretrained(path)
    full = load_file(files[0])
    shards = [read_shard_tensors(files, config, torch.float32, r, 3) for r in range(3)]
    embed = torch.cat([s["model.embed_tokens.weight"] for s in shards])
    assert embed.shape[0] == 3 * 171
    assert torch.equal(embed[:512], full["model.embed_tokens.weight"])
    assert not embed[512:].any()
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(torch.cat([s[q] for s in shards]), full[q][: 3 * (full[q].shape[0] // 3)])
    assert torch.equal(torch.cat([s[o] for s in shards], dim=1), full[o][:, : 3 * (full[o].shape[1] // 3)])
    norm = "model.norm.weight"
    assert all(torch.equal(s[norm], full[norm]) for s in shards)


def test_indivisible_tp_size_is_refused(tiny_model_dir) -> None:
    start = time.monotonic()
    with pytest.raises(TensorParallelError) as info:
        LLM(model=str(tiny_model_dir("llama")), tensor_parallel_size=3, **KW)
    message = str(info.value)
    assert "\n" not in message
    assert "tensor_parallel_size 3" in message and "2 KV heads" in message
    assert time.monotonic() - start < 10  # refused before any worker starts


def test_killed_worker_stops_the_engine(tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), tensor_parallel_size=2, **KW)
    engine = llm.engine
    try:
        with pytest.raises(ValueError, match="not supported with tensor_parallel_size"):
            engine.add_request(
                "h", {"prompt_token_ids": [1, 2], "kv_hold": True}, SamplingParams(max_tokens=1)
            )
        # An error on every rank is that call's own failure: the workers stay up and in step.
        with pytest.raises(WorkerStepError, match="rank 0: ValueError: unknown command"):
            engine.model._call_all("no-such-command", None)
        engine.add_request("a", [1, 2, 3, 4], SamplingParams(max_tokens=200, ignore_eos=True))
        engine.step()
        os.kill(engine.model._procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank 1") as info:
            for _ in range(200):
                engine.step()
        assert time.monotonic() - start < 15
        assert "killed by signal 9" in str(info.value)
        assert not engine.requests  # failed, not left running
        with pytest.raises(EngineDeadError):  # and dead for good
            engine.step()
        assert not any(p.is_alive() for p in engine.model._procs)  # no worker left behind
    finally:
        _close(llm)


@pytest.mark.slow
def test_killed_worker_fails_async_stream(tiny_model_dir) -> None:
    engine = AsyncLLM(model=str(tiny_model_dir("llama")), tensor_parallel_size=2, **KW)

    async def run() -> str:
        params = SamplingParams(max_tokens=1000, ignore_eos=True)
        try:
            async for out in engine.generate([1, 2, 3], params, "r"):
                if len(out.outputs[0].token_ids) == 3:
                    os.kill(engine.engine.model._procs[0].pid, signal.SIGKILL)
        except EngineDeadError as exc:
            return str(exc)
        return "finished"

    try:
        message = asyncio.run(asyncio.wait_for(run(), 30))
        assert "rank 0" in message
    finally:
        engine.engine.model.close()


@pytest.mark.slow
def test_tp2_int8(tiny_model_dir) -> None:
    """int8 shards quantise their own slices; TP=2 matches TP=1 under int8 too."""
    path = tiny_model_dir("llama", "small")
    kw = dict(KW, quantization="int8", kv_cache_memory="16MiB")
    reference = LLM(model=str(path), **kw)
    if not isinstance(reference.engine.model.layers[0].mlp.down_weight, Int8Weight):
        pytest.skip("the engine does not quantise at tensor_parallel_size 1 (yet)")
    one = _generate(reference, PROMPTS)
    llm = LLM(model=str(path), tensor_parallel_size=2, **kw)
    try:
        two = _generate(llm, PROMPTS)
    finally:
        _close(llm)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]

"""`EngineConfig` as users reach it: a backend by name or instance, one dtype table, chunked prefill.

A caller that built its own backend (a test double, a backend with options the registry does not
know) hands the instance to `LLM` and the engine runs on that very object. Every dtype name the
config accepts means the same torch dtype to the engine, the checkpoint loader and the CLI.
Chunked prefill can be turned off; then a prompt runs in one step or waits, and a budget too
small for the longest prompt is refused up front instead of leaving such a prompt waiting forever.
"""

from __future__ import annotations

import argparse
from typing import ClassVar

import pytest
import torch
from pydantic import ValidationError

from xllm import LLM, AsyncLLM, SamplingParams
from xllm.backends.cpu.backend import CpuBackend
from xllm.cli.engine_args import add_engine_arguments, engine_kwargs
from xllm.dtypes import DTYPE_ALIASES
from xllm.engine.config import EngineConfig
from xllm.hal import get_backend, registry
from xllm.models.config import parse_dtype


class CountingCpu(CpuBackend):
    """A CPU backend no registry knows, counting its attention calls."""

    name: ClassVar[str] = "cpu-counting"

    def __init__(self) -> None:
        super().__init__()
        self.attention_calls = 0

    def _attention(self, *args, **kwargs):
        self.attention_calls += 1
        return super()._attention(*args, **kwargs)


def greedy(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


# ---------------------------------------------------------------------------------- backend


def test_llm_runs_on_the_backend_instance_it_is_given(make_llm) -> None:
    backend = CountingCpu()
    names_before = set(registry.registered_backends())
    llm = make_llm(backend=backend, use_graphs=False)
    assert llm.engine.backend is backend
    (out,) = llm.generate([[10, 20, 30]], greedy(), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
    assert backend.attention_calls > 0  # the model ran on this object, not on a registry copy
    assert set(registry.registered_backends()) == names_before  # no name was registered for it
    # Same tokens as the registry's CPU backend opened by name.
    (by_name,) = make_llm(backend="cpu", use_graphs=False).generate([[10, 20, 30]], greedy(), use_tqdm=False)
    assert out.outputs[0].token_ids == by_name.outputs[0].token_ids


def test_async_llm_takes_a_backend_instance_too(tiny_llama_dir) -> None:
    backend = CountingCpu()
    engine = AsyncLLM(model=str(tiny_llama_dir), backend=backend, kv_cache_memory="4MiB", use_graphs=False)
    assert engine.engine.backend is backend  # its loop starts on first use, so nothing to stop


def test_config_takes_a_name_or_an_instance_and_dumps_the_name_as_json() -> None:
    backend = get_backend("cpu")
    config = EngineConfig(backend=backend)
    assert config.backend is backend
    assert config.model_dump(mode="json")["backend"] == "cpu"
    assert EngineConfig(backend="cpu").model_dump(mode="json")["backend"] == "cpu"
    with pytest.raises(ValidationError, match="backend must be a name or a xllm.hal.Backend"):
        EngineConfig(backend=object())


def test_backend_options_with_an_instance_are_refused() -> None:
    # The instance is built already: options given beside it could only be ignored silently.
    with pytest.raises(ValidationError, match="backend_options apply to a backend opened by name"):
        EngineConfig(backend=get_backend("cpu"), backend_options={"num_threads": 2})


# ---------------------------------------------------------------------------------- dtype


def test_every_dtype_name_means_one_dtype_in_config_loader_and_cli() -> None:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    for alias, canonical in DTYPE_ALIASES.items():
        want = getattr(torch, canonical)
        assert EngineConfig(dtype=alias).dtype == canonical
        assert parse_dtype(alias) is want  # config.json's dtype / torch_dtype
        assert parse_dtype(f"torch.{canonical}") is want
        kwargs = engine_kwargs(parser.parse_args(["--dtype", alias]))
        assert EngineConfig(**kwargs).dtype == canonical
    with pytest.raises(ValidationError, match="unsupported dtype 'float64'"):
        EngineConfig(dtype="float64")


def test_engine_runs_in_the_dtype_an_alias_names(tiny_llama_dir) -> None:
    llm = LLM(model=str(tiny_llama_dir), dtype="bf16", kv_cache_memory="4MiB", use_graphs=False)
    assert llm.engine.model.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------- chunked prefill


def test_chunked_prefill_off_runs_a_prompt_whole_or_lets_it_wait(make_llm) -> None:
    prompts = [list(range(10, 50)), list(range(60, 100))]  # 40 tokens each, step budget 64
    outs = {}
    for chunked in (True, False):
        llm = make_llm(
            enable_chunked_prefill=chunked, max_num_batched_tokens=64, max_model_len=64, use_graphs=False
        )
        engine = llm.engine
        assert engine.scheduler.enable_chunked_prefill is chunked
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, greedy(6))
        engine.step()
        second = engine.requests["1"].seqs[0]
        if chunked:  # the second prompt's first 24 tokens share the step with the first prompt
            assert second.num_computed_tokens == 24 and engine.scheduler.num_waiting == 0
        else:  # it does not fit the 24 tokens left, so it waits for a step of its own
            assert second.num_computed_tokens == 0 and engine.scheduler.num_waiting == 1
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        outs[chunked] = [done[str(i)].outputs[0].token_ids for i in range(len(prompts))]
    assert outs[False] == outs[True]


def test_chunked_prefill_off_needs_a_budget_for_the_longest_prompt(make_llm) -> None:
    with pytest.raises(
        ValidationError, match=r"max_num_batched_tokens \(32\) is smaller than max_model_len \(64\)"
    ):
        EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=32, max_model_len=64)
    EngineConfig(enable_chunked_prefill=True, max_num_batched_tokens=32, max_model_len=64)
    # A derived max_model_len (the tiny model's 2048 positions) is checked by the engine.
    with pytest.raises(
        ValueError, match=r"max_num_batched_tokens \(64\) is smaller than max_model_len \(2048\)"
    ):
        make_llm(enable_chunked_prefill=False, max_num_batched_tokens=64, use_graphs=False)

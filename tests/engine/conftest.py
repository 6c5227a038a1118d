"""Fixtures for the engine's behaviour tests: small float32 `LLM`s over the tiny Llama checkpoint.

Every LLM handed out here is checked when the test ends: no request may be left in the engine
and every KV block must be back in the free list (after aborts, rejections, n > 1, preemption).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from xllm import LLM

BLOCK_SIZE = 16


def kv_bytes_for(path, num_blocks: int, block_size: int = BLOCK_SIZE) -> int:
    """kv_cache_memory that gives exactly `num_blocks` usable float32 blocks of the model at `path`."""
    from xllm.models import ModelConfig

    c = ModelConfig.from_pretrained(path)
    # One block more than asked: the engine reserves physical block 0 as the null block.
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * 4 * (num_blocks + 1)


@pytest.fixture(scope="session")
def kv_bytes() -> Callable[..., int]:
    """`kv_bytes(path, num_blocks)`: kv_cache_memory for exactly that many float32 blocks."""
    return kv_bytes_for


def assert_engine_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.requests, f"requests left in the engine: {list(engine.requests)}"
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
    assert engine.kv_cache.num_used_blocks == 0, f"{engine.kv_cache.num_used_blocks} KV blocks leaked"
    assert all(b.ref_count == 0 for b in engine.kv_cache.blocks)


@pytest.fixture
def make_llm(tiny_llama_dir) -> Iterator[Callable[..., LLM]]:
    """Factory for fresh LLMs (float32, 256 KV blocks unless told); each is checked idle at teardown."""
    built: list[LLM] = []

    def make(path=None, kv_blocks: int = 256, **kwargs) -> LLM:
        path = path or tiny_llama_dir
        kwargs.setdefault(
            "kv_cache_memory", kv_bytes_for(path, kv_blocks, kwargs.get("block_size", BLOCK_SIZE))
        )
        llm = LLM(model=str(path), dtype="float32", block_size=kwargs.pop("block_size", BLOCK_SIZE), **kwargs)
        built.append(llm)
        return llm

    yield make
    for llm in built:
        assert_engine_idle(llm)


@pytest.fixture(scope="module")
def _module_llm(tiny_llama_dir) -> LLM:
    return LLM(
        model=str(tiny_llama_dir),
        dtype="float32",
        block_size=BLOCK_SIZE,
        kv_cache_memory=kv_bytes_for(tiny_llama_dir, 256),
    )


@pytest.fixture
def llm(_module_llm: LLM) -> Iterator[LLM]:
    """One LLM shared by a module's tests (loading costs a second); checked idle after each test."""
    assert_engine_idle(_module_llm)
    yield _module_llm
    assert_engine_idle(_module_llm)

"""KV-cache sizing per backend: a conservative host rule on the CPU, gpu_memory_utilization of
device memory after a profiling pass on an accelerator, an explicit size everywhere.

The accelerator rule is exercised on the CPU through a backend that declares its own device
memory (`shares_host_memory=False`) and reports a fixed device size: the engine must size from
what the backend says, run the profiling forward at the largest batch, and log the result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import pytest

from xllm import LLM
from xllm.backends.cpu.backend import CpuBackend
from xllm.engine.kv_cache_sizing import bytes_per_block
from xllm.hal import MemInfo, register_backend, unregister_backend

GiB = 1 << 30
DEVICE_TOTAL = 8 * GiB
DEVICE_FREE = 6 * GiB  # "after loading the model": 2 GiB in use


class DeviceMemoryBackend(CpuBackend):
    """A CPU backend that declares dedicated device memory of a fixed size, and records the
    largest batch its attention saw (the profiling pass must cover the largest step)."""

    largest_batch_tokens = 0

    def __init__(self, num_threads: int | None = None) -> None:
        super().__init__(num_threads)
        self._capabilities = dataclasses.replace(self._capabilities, shares_host_memory=False)

    def _mem_info(self, device_index: int) -> MemInfo:
        return MemInfo(free_bytes=DEVICE_FREE, total_bytes=DEVICE_TOTAL)

    def _attention(self, q, k, v, k_cache, v_cache, metadata):
        DeviceMemoryBackend.largest_batch_tokens = max(DeviceMemoryBackend.largest_batch_tokens, q.shape[0])
        return super()._attention(q, k, v, k_cache, v_cache, metadata)


@pytest.fixture
def device_backend() -> Iterator[str]:
    DeviceMemoryBackend.largest_batch_tokens = 0
    register_backend("cpu-device-memory", DeviceMemoryBackend)
    yield "cpu-device-memory"
    unregister_backend("cpu-device-memory")


def test_accelerator_fills_utilization_after_profiling(tiny_llama_dir, device_backend, caplog):
    with caplog.at_level(logging.INFO, logger="xllm.engine"):
        llm = LLM(
            model=str(tiny_llama_dir),
            backend=device_backend,
            dtype="float32",
            max_model_len=256,
            max_num_batched_tokens=512,
            gpu_memory_utilization=0.5,
        )
    engine = llm.engine
    per_block = bytes_per_block(engine.model, engine.block_size)
    # 0.5 * 8 GiB - 2 GiB in use = 2 GiB, plus the profiling pass's own temporary blocks.
    low = (2 * GiB) // per_block - 1
    temp_blocks = 512 // engine.block_size + 1
    assert low <= engine.kv_cache.num_blocks <= low + temp_blocks
    assert engine.kv_caches[0][0].shape[0] == engine.kv_cache.num_blocks + 1  # + the null block
    assert DeviceMemoryBackend.largest_batch_tokens == 512  # the profile ran the largest step
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "gpu_memory_utilization 0.5" in logged and "maximum concurrency for 256 tokens" in logged


def test_accelerator_without_room_fails_clearly(tiny_llama_dir, device_backend):
    with pytest.raises(ValueError, match="gpu_memory_utilization 0.2"):
        LLM(model=str(tiny_llama_dir), backend=device_backend, dtype="float32", gpu_memory_utilization=0.2)


def test_explicit_size_wins_on_any_backend(tiny_llama_dir, device_backend):
    llm = LLM(model=str(tiny_llama_dir), backend=device_backend, dtype="float32", kv_cache_memory="8MiB")
    per_block = bytes_per_block(llm.engine.model, llm.engine.block_size)
    assert llm.engine.kv_cache.num_blocks == (8 << 20) // per_block - 1
    assert DeviceMemoryBackend.largest_batch_tokens == 0  # no profiling pass was needed


def test_cpu_keeps_the_host_memory_rule(tiny_llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="xllm.engine"):
        llm = LLM(model=str(tiny_llama_dir), dtype="float32", max_model_len=128, max_num_seqs=4)
    per_block = bytes_per_block(llm.engine.model, llm.engine.block_size)
    # Every sequence slot at full length (4 x 8 blocks), and the null block beside them.
    assert llm.engine.kv_cache.num_blocks == 4 * 8
    assert llm.engine.kv_cache.num_blocks * per_block <= GiB
    assert any("KV cache (host memory)" in r.getMessage() for r in caplog.records)

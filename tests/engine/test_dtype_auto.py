"""dtype="auto" picks the checkpoint's dtype only where the backend computes it natively.

A bfloat16 checkpoint on an AVX2-only CPU would otherwise run emulated, many times slower than
float32; an explicit dtype is still honoured. The backend declares `Capabilities.native_dtypes`,
the engine chooses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from xllm import LLM
from xllm.backends.cpu.backend import CpuBackend, native_cpu_dtypes
from xllm.hal import register_backend, unregister_backend


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ({"sse4_2", "avx", "avx2", "fma"}, (torch.float32,)),  # AVX2-only x86
        ({"avx2", "avx512f", "avx512_bf16"}, (torch.float32, torch.bfloat16)),
        ({"avx2", "amx_tile", "amx_bf16", "amx_fp16"}, (torch.float32, torch.bfloat16, torch.float16)),
        ({"fp", "asimd", "asimdhp", "bf16"}, (torch.float32, torch.bfloat16, torch.float16)),  # Arm v8.6
        (set(), (torch.float32,)),
    ],
)
def test_native_cpu_dtypes_follow_the_isa(flags, native):
    assert native_cpu_dtypes(frozenset(flags)) == native


def backend_with_native(*dtypes: torch.dtype) -> type[CpuBackend]:
    class Declared(CpuBackend):
        def __init__(self, num_threads: int | None = None) -> None:
            super().__init__(num_threads)
            self._capabilities = dataclasses.replace(self._capabilities, native_dtypes=dtypes)

    return Declared


@pytest.fixture
def declared_backends() -> Iterator[None]:
    register_backend("cpu-avx2-only", backend_with_native(torch.float32))
    register_backend("cpu-with-bf16", backend_with_native(torch.float32, torch.bfloat16))
    yield
    unregister_backend("cpu-avx2-only")
    unregister_backend("cpu-with-bf16")


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with config.json declaring bfloat16, as real checkpoints do."""
    out = tmp_path_factory.mktemp("llama-bf16")
    shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_auto_runs_float32_where_bfloat16_is_emulated(declared_backends, bf16_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="xllm.engine"):
        llm = LLM(model=str(bf16_checkpoint), backend="cpu-avx2-only", dtype="auto")
    assert llm.engine.model.dtype == torch.float32
    assert llm.engine.kv_caches[0][0].dtype == torch.float32
    lines = [r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage()]
    assert len(lines) == 1 and "bfloat16" in lines[0] and "float32" in lines[0]


def test_explicit_bfloat16_is_honoured(declared_backends, bf16_checkpoint):
    llm = LLM(model=str(bf16_checkpoint), backend="cpu-avx2-only", dtype="bfloat16", max_model_len=64)
    assert llm.engine.model.dtype == torch.bfloat16


def test_auto_keeps_bfloat16_where_it_is_native(declared_backends, bf16_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="xllm.engine"):
        llm = LLM(model=str(bf16_checkpoint), backend="cpu-with-bf16", dtype="auto", max_model_len=64)
    assert llm.engine.model.dtype == torch.bfloat16
    assert not [r for r in caplog.records if "dtype auto" in r.getMessage()]

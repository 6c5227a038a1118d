"""Fixtures for the plugin's tests: the two backends, and tiny checkpoints built locally.

Checkpoints come from `xllm.models.make_model` (random weights, a local tokenizer), one per
family per session; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from xllm.hal import Backend, get_backend


@pytest.fixture(scope="session")
def jax_backend() -> Backend:
    return get_backend("jax")


@pytest.fixture(scope="session")
def cpu_backend() -> Backend:
    return get_backend("cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``tiny_model_dir("qwen3")`` -> a tiny random checkpoint of that family."""
    from xllm.models import make_model

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_model(tmp_path_factory.mktemp(f"{family}-tiny"), family, "tiny")
        return built[family]

    return get

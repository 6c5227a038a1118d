"""Session-wide fixtures: tiny real checkpoints written by `xllm.models.make_model`.

Each family's checkpoint is built once per test session (about a second each) into a pytest
temporary directory; tests must treat these directories as read-only because they are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_model_dir("qwen3")`` -> path of a tiny random checkpoint of that family."""
    from xllm.models import make_model

    built: dict[tuple[str, str, int], Path] = {}

    def get(family: str = "llama", size: str = "tiny", seed: int = 0) -> Path:
        key = (family, size, seed)
        if key not in built:
            built[key] = make_model(tmp_path_factory.mktemp(f"{family}-{size}-{seed}"), family, size, seed)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")

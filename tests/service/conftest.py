"""Fixtures for the server tests: a tiny checkpoint and real `xllm serve` subprocesses.

Test modules start one server each (module-scoped `start_server`) because loading costs seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from serve_process import ServeProcess


@pytest.fixture(scope="session")
def tiny_llama_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama checkpoint: tests/conftest.py's `tiny_model_dir` factory when present."""
    try:
        factory: Callable[..., Path] = request.getfixturevalue("tiny_model_dir")
    except pytest.FixtureLookupError:
        from xllm.models import make_model

        return Path(make_model(tmp_path_factory.mktemp("service-llama-tiny"), family="llama", size="tiny"))
    return Path(factory("llama"))


@pytest.fixture(scope="module")
def start_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``start_server("--api-key", "k")`` -> a ready `ServeProcess`, stopped at module end."""
    servers: list[ServeProcess] = []

    def start(*extra_args: str, wait: bool = True) -> ServeProcess:
        log = tmp_path_factory.mktemp("serve-log") / "serve.log"
        server = ServeProcess(tiny_llama_dir, *extra_args, log_path=log)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()

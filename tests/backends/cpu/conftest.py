"""Fixtures for the CPU reference backend tests."""

from __future__ import annotations

import pytest

from xllm.backends.cpu.backend import CpuBackend


@pytest.fixture(scope="session")
def cpu() -> CpuBackend:
    return CpuBackend()

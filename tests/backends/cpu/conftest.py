"""Fixtures for the CPU reference backend tests: its plain ops (the oracle), and with its fused
kernels."""

from __future__ import annotations

import pytest

from xllm.backends.cpu.backend import CpuBackend


@pytest.fixture(scope="session")
def cpu() -> CpuBackend:
    return CpuBackend(kernels=False)


@pytest.fixture(scope="session")
def cpu_kernels() -> CpuBackend:
    backend = CpuBackend(kernels=True)
    if backend.kernels is None:
        pytest.skip("no C compiler here: the CPU backend runs its plain ops only")
    return backend

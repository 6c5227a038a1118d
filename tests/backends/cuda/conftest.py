"""Fixtures for the CUDA backend tests.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: the ``backend``
fixture is ``get_backend("cuda", interpret=True)``, a `CudaInterpretBackend`, which sets
``TRITON_INTERPRET=1`` before the kernels are imported. Tests marked ``gpu`` use the real device and are skipped where there is none.
"""

from __future__ import annotations

import os

import pytest
import torch

from xllm.hal import Backend, get_backend

if not torch.cuda.is_available():
    # Triton fixes interpreted-vs-compiled for its own library when it is first imported, which
    # in a whole-repo run may happen before the fixture below (any test that imports triton).
    # Setting the variable when this directory is collected keeps the interpreted tests from
    # being skipped then. Only without a GPU: on a GPU machine the compiled kernels are the point.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def backend() -> Backend:
    from xllm.backends.cuda.backend import CudaBackend

    reason = CudaBackend.probe(interpret=True)
    if reason is not None:
        pytest.skip(f"cuda backend cannot interpret its kernels here: {reason}")
    return get_backend("cuda", interpret=True)


@pytest.fixture(scope="session")
def cpu() -> Backend:
    return get_backend("cpu", kernels=False)  # the plain reference ops


@pytest.fixture(scope="session")
def gpu_backend() -> Backend:
    from xllm.backends.cuda import runtime

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if runtime.interpreter_enabled():
        # Triton's interpreter switch is process-wide: once interpret-mode tests defined the
        # kernels, this process cannot compile them for the GPU. Run `pytest -m gpu` on its own.
        pytest.skip("TRITON_INTERPRET is set in this process; run the gpu tests in a separate pytest run")
    return get_backend("cuda")

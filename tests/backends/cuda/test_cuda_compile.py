"""The CUDA kernels compile for real GPUs, here, without one.

The interpreter checks what the kernels compute; only Triton's compiler can say whether they
build for a GPU and fit its shared memory. `compile_kernels.py` runs that compiler (with the
ptxas inside the triton wheel) for every kernel and the tile sizes the backend launches with.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def _compile(sm: int, max_shared_bytes: int) -> subprocess.CompletedProcess[str]:
    # find_spec, not import: importing triton here, before an interpret-mode fixture sets
    # TRITON_INTERPRET, would compile triton's library for the GPU in this process.
    # (find_spec of a submodule would import its parent package, so look for the files.)
    spec = importlib.util.find_spec("triton")
    if spec is None or not any(
        (Path(p) / "backends" / "nvidia" / "compiler.py").exists()
        for p in spec.submodule_search_locations or ()
    ):
        pytest.skip("triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, str(HERE / "compile_kernels.py"), str(sm), str(max_shared_bytes)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_kernels_compile_for_sm86_within_its_shared_memory():
    # sm_86 / sm_89 (RTX 30xx/40xx, L4, A10) give a block at most 99 KB: the tightest common budget.
    done = _compile(86, 99 * 1024)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "all kernels compiled" in done.stdout


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    done = _compile(90, 227 * 1024)  # H100 / H200
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

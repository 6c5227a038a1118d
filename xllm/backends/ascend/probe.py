"""Decides whether the Ascend backend can run here, and if not, says exactly why.

The checks run cheapest first and stop at the first failure: is torch_npu installed (a metadata
lookup, no import), is CANN's libascendcl.so loadable, does torch_npu import, is an NPU visible.
Each step is a parameter so the decision logic is tested with injected results; the defaults
touch the real system. Nothing here raises: `xllm backends` probes every backend everywhere.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType

NOT_INSTALLED = "torch_npu is not installed"
CANN_NOT_FOUND = "CANN not found (libascendcl.so not loadable; set ASCEND_HOME_PATH / source set_env.sh)"
IMPORT_FAILED = "torch_npu failed to import: {error}"
NO_DEVICE = "no NPU device visible"

ACL_LIBRARY = "libascendcl.so"
# set_env.sh exports ASCEND_HOME_PATH (CANN 8) or ASCEND_TOOLKIT_HOME (older); the default
# install prefix is the last resort.
_CANN_HOME_VARS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
_DEFAULT_CANN_HOME = "/usr/local/Ascend/ascend-toolkit/latest"


def torch_npu_installed() -> bool:
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        return False


def acl_library_candidates() -> list[str]:
    """Where libascendcl.so may be: the loader path first, then each CANN home's lib64."""
    paths = [ACL_LIBRARY]
    for var in _CANN_HOME_VARS:
        home = os.environ.get(var)
        if home:
            paths.append(os.path.join(home, "lib64", ACL_LIBRARY))
    paths.append(os.path.join(_DEFAULT_CANN_HOME, "lib64", ACL_LIBRARY))
    return paths


def load_acl_library() -> ctypes.CDLL | None:
    """libascendcl.so as a ctypes library, or None when no candidate loads."""
    for path in acl_library_candidates():
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def import_torch_npu() -> ModuleType:
    return importlib.import_module("torch_npu")


def npu_device_count() -> int:
    import torch

    npu = getattr(torch, "npu", None)  # torch_npu registers torch.npu on import
    return int(npu.device_count()) if npu is not None else 0


def probe_reason(
    *,
    installed: Callable[[], bool] = torch_npu_installed,
    load_acl: Callable[[], object | None] = load_acl_library,
    import_npu: Callable[[], ModuleType] = import_torch_npu,
    device_count: Callable[[], int] = npu_device_count,
) -> str | None:
    """None when the backend can run, else the one-line reason; never raises."""
    try:
        if not installed():
            return NOT_INSTALLED
        if load_acl() is None:
            return CANN_NOT_FOUND
        try:
            import_npu()
        except Exception as exc:  # e.g. ImportError: libhccl.so: cannot open shared object file
            return IMPORT_FAILED.format(error=f"{type(exc).__name__}: {exc}")
        if device_count() <= 0:
            return NO_DEVICE
        return None
    except Exception as exc:  # a probe must answer, whatever the environment does
        return f"probe failed: {type(exc).__name__}: {exc}"

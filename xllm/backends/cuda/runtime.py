"""Lazy access to Triton for the CUDA backend, and the interpreter switch.

Triton reads ``TRITON_INTERPRET`` to decide whether ``@triton.jit`` kernels compile for the GPU
or run in its NumPy interpreter: older releases read it when `triton` is first imported, newer
ones when each kernel is decorated (so when our kernel modules are imported). Interpret mode
therefore sets the variable before either happens, and then checks that the kernels really did
come out interpreted. Nothing here imports triton until asked.
"""

from __future__ import annotations

import importlib.util
import os
import sys

INTERPRET_ENV = "TRITON_INTERPRET"


def triton_installed() -> bool:
    return "triton" in sys.modules or importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get(INTERPRET_ENV, "0") not in ("", "0")


def enable_interpreter() -> str | None:
    """Turns the Triton interpreter on; None on success, else why it cannot be turned on.

    Sets ``TRITON_INTERPRET=1`` in this process's environment if it is not set: a process-wide
    side effect, needed because triton reads the variable at import/decoration time. Then imports
    the kernels and fails if they were compiled for the GPU anyway (triton or our kernel modules
    were imported before the variable was set).
    """
    if not triton_installed():
        return "triton is not installed"
    if not interpreter_enabled():
        os.environ[INTERPRET_ENV] = "1"
    try:
        from xllm.backends.cuda.kernels import attention
    except Exception as exc:  # a probe must report, not raise
        return f"cannot import the Triton kernels: {type(exc).__name__}: {exc}"
    if type(attention.paged_attention_kernel).__name__ != "InterpretedFunction":
        return (
            f"triton kernels were compiled before {INTERPRET_ENV}=1 was set; "
            "set it in the environment before starting Python"
        )
    return None

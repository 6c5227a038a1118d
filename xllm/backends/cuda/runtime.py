"""Lazy access to Triton for the CUDA backend, and the interpreter switch.

Triton reads ``TRITON_INTERPRET`` whenever a function is decorated with ``@triton.jit``: ours when
our kernel modules are imported, but also triton's own library functions (``tl.cdiv``, the
combine functions behind ``tl.sum``) when `triton` itself is first imported. A kernel interpreted
on top of a library compiled for the GPU fails at its first reduction. So interpret mode must set
the variable before triton is imported at all, refuses when that already happened without it, and
finally checks that both our kernels and triton's library came out interpreted. Nothing here
imports triton until asked.
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
    side effect, needed because triton reads the variable at import and decoration time. Then
    imports the kernels and fails if they or triton's library were compiled for the GPU anyway
    (triton or our kernel modules were imported before the variable was set).
    """
    if not triton_installed():
        return "triton is not installed"
    if not interpreter_enabled():
        if "triton" in sys.modules:
            return _TOO_LATE
        os.environ[INTERPRET_ENV] = "1"
    try:
        import triton.language.standard as triton_library

        from xllm.backends.cuda.kernels import attention
    except Exception as exc:  # a probe must report, not raise
        return f"cannot import the Triton kernels: {type(exc).__name__}: {exc}"
    for fn in (attention.paged_attention_kernel, triton_library.cdiv):
        if type(fn).__name__ != "InterpretedFunction":
            return _TOO_LATE
    return None


_TOO_LATE = (
    f"triton was imported before {INTERPRET_ENV}=1 was set, so its kernels are compiled for the GPU; "
    "set it in the environment before starting Python"
)

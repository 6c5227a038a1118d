"""Builds the CPU backend's C kernels once per machine and loads them with ctypes.

A source is compiled (``-O3 -march=native -fopenmp``) with the system's C compiler into
``$XDG_CACHE_HOME/xllm/kernels``, under a name that hashes the source, the compiler, the flags and
the host's CPU features (``-march=native`` code runs only on CPUs with the same features), in well
under a second. The OpenMP runtime is the libgomp torch has already loaded, so kernels and torch
share one thread pool. Where there is no compiler or the build fails, `load` returns None (logged
once per library) and the caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger("xllm.backends.cpu")

BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xllm" / "kernels"


def _host_key() -> str:
    from xllm.backends.cpu.backend import cpu_flags

    return " ".join(sorted(cpu_flags()))


def load(name: str, source: str, extra_flags: tuple[str, ...] = (), what: str = "") -> ctypes.CDLL | None:
    """The compiled library `name` of `source`, building it on first use; None if it cannot be
    built (`what` says in the warning what the caller does instead)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: %s", what or f"the {name} kernels are off")
        return None
    flags = (*BASE_FLAGS, *extra_flags)
    key = hashlib.sha256("\n".join((source, compiler, *flags, _host_key())).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}_{key}.so"
    try:
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src = Path(tmp) / f"{name}.c"
                src.write_text(source)
                built = Path(tmp) / target.name
                subprocess.run(
                    [compiler, *flags, str(src), "-o", str(built)],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                os.replace(built, target)  # atomic: concurrent builders each install a whole file
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        logger.warning("cannot build the %s kernels (%s): %s", name, detail, what or "they are off")
        return None

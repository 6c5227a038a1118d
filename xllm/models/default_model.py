"""The embedded default model: a tiny random Llama written to the cache directory on first use.

`xllm generate` and `LLM()` without a model path use it, so xllm works offline out of the box.
The checkpoint is rebuilt from code (`make_model`), never downloaded. Several processes may ask
for it at once (parallel tests, a server and a CLI): each builds into its own temporary
directory and renames it into place, so readers only ever see a complete checkpoint; the loser
of the race discards its copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from xllm.models.make_model import MAKE_MODEL_VERSION, make_model

DEFAULT_FAMILY = "llama"
DEFAULT_SIZE = "tiny"
DEFAULT_SEED = 0
STAMP_FILE = "xllm_model.json"  # records what built the directory, to detect stale caches
CACHE_ENV_VAR = "XLLM_CACHE_DIR"


def cache_root() -> Path:
    """``$XLLM_CACHE_DIR`` if set, else ``~/.cache/xllm``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xllm"


def _stamp() -> dict[str, object]:
    return {
        "family": DEFAULT_FAMILY,
        "size": DEFAULT_SIZE,
        "seed": DEFAULT_SEED,
        "version": MAKE_MODEL_VERSION,
    }


def _is_current(path: Path) -> bool:
    try:
        return json.loads((path / STAMP_FILE).read_text()) == _stamp()
    except (OSError, ValueError):
        return False


def default_model_path() -> Path:
    """Path of the default model directory, building it first if it is missing or stale."""
    target = cache_root() / "default-model"
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-model-", dir=target.parent))
    try:
        make_model(tmp, DEFAULT_FAMILY, DEFAULT_SIZE, DEFAULT_SEED)
        # The stamp is written last: a directory without it was never completed.
        (tmp / STAMP_FILE).write_text(json.dumps(_stamp(), sort_keys=True) + "\n")
        if target.exists() and not _is_current(target):
            # Stale (older generator): move it aside first; rename is atomic, rmtree is not.
            stale = Path(tempfile.mkdtemp(prefix=".stale-default-model-", dir=target.parent))
            try:
                os.replace(target, stale / "model")
            except OSError:
                pass  # another process replaced it already
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its copy is identical (deterministic build).
            if not _is_current(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

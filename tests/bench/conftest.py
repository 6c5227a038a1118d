"""Fixtures of the bench tests: a stand-in `vllm` package for the vLLM peer's subprocess."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

# The API surface vllm_worker.py uses: enough to check the subprocess protocol (spec file in, JSON
# on stdout among log lines) without installing vLLM. Each engine start, prefix-cache reset and
# generate call is logged to $FAKE_VLLM_LOG; with $FAKE_VLLM_DRIFT set, every call answers other
# tokens than the last. Its tokens are never the model's.
FAKE_VLLM = textwrap.dedent(
    """
    import os

    __version__ = "0.0-fake"

    def _log(line):
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
            f.write(line + "\\n")

    class SamplingParams:
        def __init__(self, temperature, max_tokens, ignore_eos):
            assert temperature == 0.0 and ignore_eos
            self.max_tokens = max_tokens

    class _Completion:
        def __init__(self, ids):
            self.token_ids = ids

    class _Output:
        def __init__(self, ids):
            self.outputs = [_Completion(ids)]

    class LLM:
        def __init__(self, model, dtype, max_model_len, seed):
            self.calls = 0
            print("INFO fake vllm log line on stdout")
            _log("start")

        def reset_prefix_cache(self):
            _log("reset")
            return True

        def generate(self, prompts, params, use_tqdm=False):
            _log(f"generate {len(prompts)}")
            self.calls += 1
            token = 7 + self.calls if os.environ.get("FAKE_VLLM_DRIFT") else 7
            return [_Output([token] * p.max_tokens) for p in params]
    """
)


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch) -> Path:
    """Puts the stand-in `vllm` on the PYTHONPATH of subprocesses; returns its call log."""
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_VLLM)
    log = tmp_path / "vllm.log"
    # The worker subprocess inherits the environment; this process does not see the fake package.
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    return log

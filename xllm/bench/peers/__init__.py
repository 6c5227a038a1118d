"""Peers of `xllm bench throughput --compare`: other engines run on the same workload, same run.

Every peer gets the same prompt token ids and per-prompt output lengths (EOS ignored, greedy) in
the same dtype, and reports wall time and output tokens. With ``PeerContext.repeats`` N > 1 it
runs the measured workload N times after its warm-up and reports the best (minimum) time, as
`timeit` does: on a shared host the fastest run is the one least disturbed by others. Greedy runs
must agree token for token (`best_of` checks). A peer whose library is missing is not an error:
`Peer.unavailable` returns one line saying how to install it and the bench prints it.

The modules ``transformers_peer``, ``llama_cpp_peer`` and ``vllm_peer`` import nothing from xllm
at module level: the start-up workload runs each of them as a script in a fresh process, where
importing xllm would add its own import time to the peer's figure (and vLLM's script runs under
another Python that has no xllm at all).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from xllm.bench.workloads import Workload

# A peer script prints this before the id of its first generated token; the start-up workload
# measures the time until that line (vLLM logs to stdout, so "first byte" would be too early).
FIRST_TOKEN_MARKER = "XLLM_BENCH_FIRST_TOKEN"
RESULT_MARKER = "XLLM_BENCH_RESULT"

PEER_DIR = Path(__file__).resolve().parent


@dataclass
class PeerResult:
    name: str
    elapsed_s: float  # the best (minimum) of `elapsed_runs_s`
    output_tokens: int
    total_tokens: int
    note: str = ""
    token_ids: list[list[int]] | None = field(default=None, repr=False)
    elapsed_runs_s: list[float] = field(default_factory=list)  # every measured run, in order

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    @property
    def total_tokens_per_s(self) -> float:
        return self.total_tokens / self.elapsed_s if self.elapsed_s > 0 else float("inf")


@dataclass
class PeerContext:
    """What every peer needs besides the workload."""

    model_path: str
    dtype: str  # canonical name: float32, float16, bfloat16
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    hf_batch_size: int | None = None
    vllm_python: str | None = None
    gguf_cache_dir: Path | None = None
    repeats: int = 1  # measured runs after the warm-up; the best one is reported


class RepeatMismatchError(RuntimeError):
    """Two greedy runs of one engine on one workload produced different tokens: a determinism bug
    in that engine (or its use here), reported rather than averaged away."""


def best_of(
    name: str,
    runs: list[tuple[list[list[int]] | None, float]],
    output_tokens: int,
    total_tokens: int,
    note: str = "",
) -> PeerResult:
    """A result from `runs` of (token ids, seconds) of the same workload: the minimum time, and
    the token ids, which every run must have produced identically (greedy decoding)."""
    assert runs, "at least one measured run"
    first = runs[0][0]
    for i, (token_ids, _) in enumerate(runs[1:], start=2):
        if first is not None and token_ids is not None and token_ids != first:
            differ = sum(a != b for a, b in zip(first, token_ids, strict=True))
            raise RepeatMismatchError(
                f"{name}: greedy run {i} of {len(runs)} gave other tokens than run 1 "
                f"for {differ}/{len(first)} requests"
            )
    times = [seconds for _, seconds in runs]
    return PeerResult(
        name, min(times), output_tokens, total_tokens, note=note, token_ids=first, elapsed_runs_s=times
    )


class Peer(Protocol):
    name: str

    def unavailable(self, ctx: PeerContext) -> str | None:
        """None when the peer can run here, else one line saying why not and how to install it."""

    def run(self, ctx: PeerContext, workload: Workload) -> PeerResult:
        """Warms up, then runs the workload `ctx.repeats` times and reports the best time
        (one-time loading excluded); see `best_of`."""

    def startup(self, ctx: PeerContext, workload: Workload) -> float:
        """Seconds from launching a fresh process to its first generated token."""


class InProcessPeer(Peer, Protocol):
    """A peer that runs in the bench's own process, so its runs can alternate with xllm's
    (``--interleave``): a slow minute of a shared host then costs every engine alike."""

    def timed_runs(self, ctx: PeerContext, workload: Workload) -> tuple[str, TimedRuns]:
        """Loads and warms up, then returns the table note and an endless iterator of measured
        runs, (token ids, seconds) each; the model lives until the iterator is closed."""


# (token ids, seconds) of one measured run of a workload
TimedRuns = Iterator[tuple[list[list[int]], float]]


def take_runs(name: str, runs: TimedRuns, repeats: int, workload: Workload, note: str) -> PeerResult:
    """`repeats` runs from `runs` (then closed, freeing the model), as a `best_of` result."""
    try:
        taken = [next(runs) for _ in range(repeats)]
    finally:
        runs.close()
    return best_of(name, taken, workload.output_tokens, workload.output_tokens + workload.input_tokens, note)


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass
class LaunchResult:
    seconds: float
    first_line: str


def time_to_first_token(
    cmd: list[str],
    marker: str | None = FIRST_TOKEN_MARKER,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
) -> LaunchResult:
    """Launches `cmd` and times until a stdout line starts with `marker` (or until the first
    stdout byte when `marker` is None); the process is then left to finish normally."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        assert proc.stdout is not None
        seconds: float | None = None
        line = ""
        try:
            if marker is None:
                first = proc.stdout.read(1)
                if first:
                    seconds = time.perf_counter() - start
                    line = first.decode(errors="replace")
            else:
                for raw in proc.stdout:
                    text = raw.decode(errors="replace")
                    if text.startswith(marker):
                        seconds = time.perf_counter() - start
                        line = text.strip()
                        break
            proc.stdout.read()  # drain so the child never blocks on a full pipe
            proc.wait(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if seconds is None or proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"{' '.join(cmd[:4])} ... exited with {proc.returncode} before its first token: "
                + " | ".join(tail)
            )
        return LaunchResult(seconds, line)


def peer_script(module_file: str) -> str:
    """Path of a peer module, to run as a plain script (no package import, see module docstring)."""
    return str(PEER_DIR / module_file)


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def get_peers() -> dict[str, Peer]:
    from xllm.bench.peers.llama_cpp_peer import LlamaCppPeer
    from xllm.bench.peers.transformers_peer import TransformersPeer
    from xllm.bench.peers.vllm_peer import VllmPeer

    return {"transformers": TransformersPeer(), "llama.cpp": LlamaCppPeer(), "vllm": VllmPeer()}


PEER_NAMES: tuple[str, ...] = ("transformers", "llama.cpp", "vllm")

# Used when the bench process itself must run the peer's script entry point.
PYTHON = sys.executable

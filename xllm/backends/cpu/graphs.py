"""The CPU backend's graphs: a decode step recorded as a program of its C kernels, replayed in C.

A CUDA graph removes the host's per-kernel launch cost from a decode step; on a CPU the same cost
is Python's, a few microseconds per op, and a small batch pays it about a hundred times a step
(1.5-2 ms of a 7.5 ms step on the 100M-parameter Llama). `CpuGraphRunner` captures a bucket by
running the step once with `kernels.recording` on: every kernel call is written down with its
arguments (buffer addresses, sizes, eps and scale), and every buffer a kernel allocated is kept
alive. Replay is one C call (`xllm_replay`) that runs the recorded kernels again on the static
input buffers, which the `GraphRunner` base fills before each replay, exactly as a CUDA graph
reads its static inputs. Kernels that take lengths at run time (paged attention reads
`seq_lens` and the block tables from those buffers) see each step's values.

A recording is only sound if the kernels did all the work. While recording, a torch dispatch
mode watches every ATen op: views and allocations are fine (they are pointer arithmetic the
program has already captured), anything that computes (an op a kernel does not cover, a dtype
conversion of an input, a collective of tensor parallelism) means the program would miss it,
and so does another native kernel (the int8 linear) or an op replaced in Python. Then the runner
says why, once, and runs steps eagerly, as it does for buckets past `GRAPH_MAX_ROWS` or past the
memory the recordings may keep (`GRAPH_MEMORY_BYTES`); those steps run at their own batch size,
unpadded. A replay whose kernels find an index out of range stops and the step runs eagerly,
where the reference ops raise the usual error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xllm.backends.cpu import kernels
from xllm.hal.graphs import EagerGraphRunner

logger = logging.getLogger("xllm.backends.cpu")

# Buckets up to this many rows are recorded, while the buffers they keep (each bucket its own)
# fit in GRAPH_MEMORY_BYTES: about 14 KB per row per layer of the 100M Llama, so every bucket up
# to 64 rows (184 rows' worth, 31 MB); about 60 KB for a 7B Llama, so the buckets up to 32. Past
# them the GEMMs dwarf the Python a recording saves.
GRAPH_MAX_ROWS = 64
GRAPH_MEMORY_BYTES = 256 << 20
# Every size up to 16, then every 8th: on a CPU a padding row costs as much as a real one, and
# a bucket is recorded only once it is used, so fine buckets cost nothing until then. A verify
# step of 5 rows (one sequence, 4 guesses) ran in bucket 8 before: 10.8 ms of GEMMs for 6.6.
CPU_CAPTURE_SIZES: tuple[int, ...] = (*range(1, 17), *range(24, 257, 8))

_ALLOCATIONS = frozenset({torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default})


class _ComputeWatch(TorchDispatchMode):
    """Notes the ATen ops that compute something (not a view, not an allocation)."""

    def __init__(self) -> None:
        super().__init__()
        self.computed: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not (func.is_view or func in _ALLOCATIONS):
            self.computed.append(str(func))
        return func(*args, **(kwargs or {}))


class CpuGraphRunner(EagerGraphRunner):
    """`own_ops()` says whether the backend still runs its own ops: one whose ops a subclass or a
    patch replaced in Python (to inject a fault, say) replays eagerly, since a program would skip
    that Python; it is asked at every capture and replay."""

    def __init__(self, *args: Any, own_ops: Callable[[], bool] = lambda: True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._own_ops = own_ops
        self._programs: dict[int, torch.Tensor] = {}
        self._graph_inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._graph_outputs: dict[int, torch.Tensor] = {}
        self._buffers: dict[int, list[torch.Tensor]] = {}
        self.eager_reason: str | None = None if kernels.available() else "the C kernels are not built here"

    def is_recorded(self, size: int) -> bool:
        return size in self._programs

    def _may_record(self, size: int) -> bool:
        if size > GRAPH_MAX_ROWS or self.eager_reason is not None or not self._own_ops():
            return False
        kept = sum(b.nbytes for buffers in self._buffers.values() for b in buffers)
        rows = sum(self._buffers)
        return not rows or kept + kept / rows * size <= GRAPH_MEMORY_BYTES

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        """A batch whose bucket is (or will be) recorded replays it; any other runs the step
        eagerly at its own size: padding it to the bucket would only add rows to compute."""
        sizes = {t.shape[0] for t in inputs.values()}
        bucket = self.bucket_for(sizes.pop()) if len(sizes) == 1 else None
        if bucket is None or bucket in self._programs or self._may_record(bucket):
            return super().run(**inputs)  # checks the inputs; raises for a batch past every bucket
        if set(inputs) != set(self.static_inputs):
            raise ValueError(
                f"GraphRunner.run expects inputs {sorted(self.static_inputs)}, got {sorted(inputs)}"
            )
        return self.fn(**inputs)

    def _capture(self, size: int, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        if not self._may_record(size):
            super()._capture(size, fn, inputs)
            return
        watch = _ComputeWatch()
        with kernels.recording() as recorder, watch:
            result = fn(**inputs)
        why = None
        if watch.computed:
            why = f"torch ops outside the kernels ran in it ({', '.join(sorted(set(watch.computed))[:4])})"
        elif recorder.foreign:
            why = f"a kernel that is not recorded ran in it ({', '.join(sorted(set(recorder.foreign)))})"
        elif not any(result.data_ptr() == b.data_ptr() for b in recorder.buffers):
            why = "its output is not a buffer a kernel wrote"
        if why is not None:
            self.eager_reason = why
            logger.info("CPU graphs off, decode steps replay eagerly: %s", why)
            super()._capture(size, fn, inputs)
            return
        self._programs[size] = recorder.program()
        self._buffers[size] = recorder.buffers
        self._graph_inputs[size] = inputs
        self._graph_outputs[size] = result

    def _replay(self, size: int) -> torch.Tensor:
        program = self._programs.get(size)
        if program is None:
            return super()._replay(size)
        if not self._own_ops() or not kernels.replay(program):
            # An index out of range: the eager step's reference ops raise it clearly.
            return self.fn(**self._graph_inputs[size])
        return self._graph_outputs[size]

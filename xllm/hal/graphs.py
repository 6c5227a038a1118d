"""Graph capture and replay of a decode step, bucketed by batch size.

A `GraphRunner` owns static input buffers sized for the largest bucket. For each capture size s
it captures ``fn(**inputs[:s])`` once; at run time it copies a batch of b <= s rows into the
buffers, fills rows b..s with each input's pad value, replays bucket s and returns the first b
output rows. The pad values must describe harmless rows (for attention: one-token sequences over
block 0 writing slot -1, see `AttentionMetadata`).

The bookkeeping is shared here; a backend supplies `_capture` and `_replay` (CUDA graphs, ACL
graphs, or `EagerGraphRunner` below: eager re-execution for backends without graph capture, which
keeps the engine on the code path a GPU uses).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# vLLM's default ladder: small sizes one by one, then steps of 8.
DEFAULT_CAPTURE_SIZES: tuple[int, ...] = (1, 2, 4, *range(8, 257, 8))


@dataclass(frozen=True, slots=True)
class GraphInput:
    """One static input: a [batch, *trailing_shape] buffer of `dtype`, padded with `pad_value`."""

    dtype: torch.dtype
    trailing_shape: tuple[int, ...] = ()
    pad_value: int | float = 0


class GraphRunner(ABC):
    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        device: torch.device | str,
        capture_sizes: Sequence[int] | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        sizes = sorted(set(capture_sizes or DEFAULT_CAPTURE_SIZES))
        if max_batch_size is not None:
            sizes = [s for s in sizes if s <= max_batch_size]
        if not sizes or sizes[0] < 1:
            raise ValueError(f"capture_sizes must hold positive sizes, got {capture_sizes}")
        self.fn = fn
        self.input_specs = dict(inputs)
        self.device = torch.device(device)
        self.capture_sizes: list[int] = sizes
        self.max_capture_size = sizes[-1]
        self.static_inputs: dict[str, torch.Tensor] = {
            name: torch.full(
                (self.max_capture_size, *spec.trailing_shape),
                spec.pad_value,
                dtype=spec.dtype,
                device=self.device,
            )
            for name, spec in self.input_specs.items()
        }
        self._captured: set[int] = set()

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest capture size >= batch_size, or None if the batch is too large to replay."""
        for size in self.capture_sizes:
            if size >= batch_size:
                return size
        return None

    @property
    def is_captured(self) -> bool:
        return len(self._captured) == len(self.capture_sizes)

    def capture(self) -> None:
        """Captures every bucket, largest first (so a shared memory pool is sized once)."""
        for size in reversed(self.capture_sizes):
            if size not in self._captured:
                self._capture_bucket(size)

    def _capture_bucket(self, size: int) -> None:
        # Capturing executes `fn` (warm-up runs, or the eager run on the CPU). Whatever the
        # buffers held would be fed through it, and a stale slot mapping would write K/V into
        # blocks that now belong to other sequences, so every row is a harmless pad row first.
        for name, buf in self.static_inputs.items():
            buf[:size].fill_(self.input_specs[name].pad_value)
        views = {name: buf[:size] for name, buf in self.static_inputs.items()}
        self._capture(size, self.fn, views)
        self._captured.add(size)

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Replays the bucket that fits this batch and returns the batch's output rows.

        The returned tensor is a view of a static buffer: the next `run` overwrites it.
        """
        if set(inputs) != set(self.static_inputs):
            raise ValueError(
                f"GraphRunner.run expects inputs {sorted(self.static_inputs)}, got {sorted(inputs)}"
            )
        batch_sizes = {t.shape[0] for t in inputs.values()}
        if len(batch_sizes) != 1:
            raise ValueError(
                f"all graph inputs must share the batch dimension, got sizes {sorted(batch_sizes)}"
            )
        batch_size = batch_sizes.pop()
        size = self.bucket_for(batch_size)
        if size is None:
            raise ValueError(
                f"batch of {batch_size} exceeds the largest capture size {self.max_capture_size}"
            )
        for name, tensor in inputs.items():
            spec = self.input_specs[name]
            if tuple(tensor.shape[1:]) != spec.trailing_shape:
                raise ValueError(
                    f"graph input {name!r} has trailing shape {tuple(tensor.shape[1:])}, expected {spec.trailing_shape}"
                )
        if size not in self._captured:
            # Capture on first use; engines on real graph backends capture everything up front
            # with `capture()` so serving never pays for it.
            self._capture_bucket(size)
        for name, tensor in inputs.items():
            buf = self.static_inputs[name]
            spec = self.input_specs[name]
            buf[:batch_size].copy_(tensor, non_blocking=True)
            if size > batch_size:
                buf[batch_size:size].fill_(spec.pad_value)
        return self._replay(size)[:batch_size]

    @abstractmethod
    def _capture(self, size: int, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        """Records ``fn(**inputs)`` for bucket `size`; `inputs` are views of the static buffers."""

    @abstractmethod
    def _replay(self, size: int) -> torch.Tensor:
        """Re-runs bucket `size` over the current buffer contents and returns its static output."""


class EagerGraphRunner(GraphRunner):
    """Replay without a device graph: the same static input buffers, buckets and padding rows as
    a real graph, and a static output (one pool shared by all buckets, like a CUDA graph pool);
    replay re-runs `fn` eagerly over the static inputs. The CPU backend's runner, and the fallback
    of any backend without graph capture (the CUDA backend under the Triton interpreter)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._output_pool: torch.Tensor | None = None  # shared by all buckets, like a CUDA graph pool

    def _capture(self, size: int, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        result = fn(**inputs)
        pool = self._output_pool
        # Buckets are captured largest first, so the first output sizes the pool for all of them.
        if (
            pool is None
            or pool.shape[0] < size
            or pool.shape[1:] != result.shape[1:]
            or pool.dtype != result.dtype
        ):
            pool = torch.empty_like(result)
            self._output_pool = pool
        out = pool[:size]
        out.copy_(result)
        self._inputs[size] = inputs
        self._outputs[size] = out

    def _replay(self, size: int) -> torch.Tensor:
        out = self._outputs[size]
        out.copy_(self.fn(**self._inputs[size]))
        return out

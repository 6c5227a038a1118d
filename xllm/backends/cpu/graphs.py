"""Eager "graph" runner of the CPU backend.

There is no graph to capture on the CPU, but the engine should run the same code path it runs on
a GPU: static input buffers, bucketed batch sizes, padding rows and a static output. Capture runs
`fn` once per bucket to size the static output; replay re-runs `fn` eagerly over the same static
input views and copies the result into that output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from xllm.hal.graphs import GraphRunner


class CpuGraphRunner(GraphRunner):
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

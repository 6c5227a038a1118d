"""Graph runners of the CUDA backend.

`CudaGraphRunner` records each decode bucket as a `torch.cuda.CUDAGraph`. All buckets share one
memory pool (``torch.cuda.graph_pool_handle()``) and are captured largest first (the base class's
order), so the pool is sized by the largest bucket and the smaller ones reuse its blocks instead
of each holding its own activations. Before capture, `fn` runs on a side stream a few times: that
compiles the Triton kernels, lets cuBLAS pick algorithms and allocate workspaces, and keeps those
one-time allocations out of the graph (PyTorch's recommended warm-up).

Where real graphs are unavailable (the Triton interpreter) the HAL's `EagerGraphRunner` replays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from xllm.hal import GraphInput, GraphRunner


class CudaGraphRunner(GraphRunner):
    NUM_WARMUP_RUNS = 2

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        device: torch.device | str,
        capture_sizes: Sequence[int] | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(fn, inputs, device, capture_sizes, max_batch_size)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # each bucket's static output, written by replay
        self._pool: Any = None

    def _capture(self, size: int, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(self.NUM_WARMUP_RUNS):
                    fn(**inputs)
            current.wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = fn(**inputs)
        self._graphs[size] = graph
        self._outputs[size] = output

    def _replay(self, size: int) -> torch.Tensor:
        self._graphs[size].replay()
        return self._outputs[size]

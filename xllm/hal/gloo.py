"""Host collectives over torch.distributed's gloo backend: the `Communicator` of any backend
whose tensors live in host memory (the CPU reference, and out-of-tree ports such as the JAX
plugin, which used to carry a copy: a backend may import the HAL, never another backend).

One communicator owns the process's default process group: it is created on construction and
destroyed by `close`. Used for tensor parallelism across CPU processes and as the reference the
NCCL/HCCL communicators are tested against.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from xllm.hal.comm import Communicator


class GlooCommunicator(Communicator):
    def __init__(self, rank: int, world_size: int, init_method: str, timeout_s: float = 300.0) -> None:
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process; close the other communicator first"
            )
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.rank = rank
        self.world_size = world_size
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("communicator is closed")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check_open()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check_open()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._check_open()
        dist.send(tensor.contiguous(), dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._check_open()
        if tensor.is_contiguous():
            dist.recv(tensor, src)
        else:  # gloo writes into contiguous buffers only
            buf = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            dist.recv(buf, src)
            tensor.copy_(buf)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_open()
        if tensor.is_contiguous():
            dist.broadcast(tensor, src)
        else:  # gloo reads and writes contiguous buffers only
            buf = tensor.contiguous()
            dist.broadcast(buf, src)
            tensor.copy_(buf)
        return tensor

    def barrier(self) -> None:
        self._check_open()
        dist.barrier()

    def close(self) -> None:
        if not self._closed:
            dist.destroy_process_group()
            self._closed = True

"""Communication part of the HAL: collectives for tensor parallelism and point-to-point KV transfer.

Every backend hands out a `Communicator` over its torch.distributed backend (gloo, NCCL, HCCL).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Communicator(ABC):
    """One process's membership in a group of ``world_size`` ranks."""

    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` across ranks in place and returns it."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's `tensor` along dim 0 (rank order)."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Sends `tensor` to rank `dst` (blocking)."""

    @abstractmethod
    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receives into `tensor` from rank `src` (blocking) and returns it."""

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copies rank `src`'s `tensor` into `tensor` on every rank (in place) and returns it.

        Not abstract so that an out-of-tree communicator written before it existed keeps working:
        this fallback is ``world_size - 1`` sends from `src`; in-tree backends use their
        library's broadcast.
        """
        if self.rank == src:
            for dst in range(self.world_size):
                if dst != src:
                    self.send(tensor, dst)
            return tensor
        return self.recv(tensor, src)

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Leaves the group; the communicator cannot be used afterwards."""

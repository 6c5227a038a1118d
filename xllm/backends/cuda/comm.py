"""Collectives of the CUDA backend: torch.distributed over NCCL (gloo in interpret mode, where
tensors live on the host)."""

from __future__ import annotations

import torch

from xllm.hal import Communicator


class TorchDistCommunicator(Communicator):
    def __init__(
        self, rank: int, world_size: int, init_method: str, backend: str, device: torch.device
    ) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = device
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialised in this process; one communicator per process"
            )
        kwargs: dict[str, object] = {}
        if backend == "nccl":
            # Bind the rank to its GPU before NCCL creates its communicator (and let torch create
            # it eagerly for this device instead of guessing at the first collective).
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs)
        self._open = True

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(tensor)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        if self.backend != "nccl":  # gloo's support for the fused gather varies across torch releases
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            self._dist.all_gather(parts, tensor)
            return torch.cat(parts, dim=0)
        out = torch.empty(
            (self.world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
        )
        self._dist.all_gather_into_tensor(out, tensor)
        return out

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._dist.send(tensor.contiguous(), dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self._dist.recv(tensor, src)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if tensor.is_contiguous():
            self._dist.broadcast(tensor, src)
        else:
            buf = tensor.contiguous()
            self._dist.broadcast(buf, src)
            tensor.copy_(buf)
        return tensor

    def barrier(self) -> None:
        if self.backend == "nccl":
            self._dist.barrier(device_ids=[self.device.index or 0])
        else:
            self._dist.barrier()

    def close(self) -> None:
        if self._open:
            self._dist.destroy_process_group()
            self._open = False

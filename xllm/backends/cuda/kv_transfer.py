"""KV transfer for the CUDA backend: the HAL's TCP engine with page-locked staging.

GPU caches are gathered into a pinned host buffer, sent over TCP, received into a pinned buffer
and scattered into the destination blocks (`xllm.hal.tcp_kv_transfer`); pinned memory makes the
two device copies DMA transfers instead of bounce-buffered ones. In interpret mode the caches are
host tensors and move without any copy, as on the CPU backend.

Untested on GPU hardware (written on a machine without one): the staged path itself is exercised
on the CPU by the tests (``zero_copy=False``). Not done: an NCCL point-to-point path. Between two
independent servers it needs a pair communicator created per peer outside the default process
group (an NCCL unique id exchanged over this engine's TCP connection, then ``ncclCommInitRank``
for ranks 0/1, as vLLM's stateless groups do) and ``ncclSend``/``ncclRecv`` of the gathered
blocks on a side stream; the TCP header and validation would stay as they are. NIXL (RDMA reads
from registered cache memory) is the other candidate where it is installed.
"""

from __future__ import annotations

import torch

from xllm.hal.kv_transfer import KVTransferEngine
from xllm.hal.tcp_kv_transfer import TcpKVTransferEngine


def create_cuda_kv_transfer(host: str, port: int, **options: object) -> KVTransferEngine:
    """A started TCP engine whose staging buffers are pinned when a GPU is visible."""
    options.setdefault("pin_memory", torch.cuda.is_available())
    options.setdefault("synchronize", torch.cuda.synchronize)
    return TcpKVTransferEngine(host, port, **options).start()  # type: ignore[arg-type]

"""KV transfer on Ascend: the HAL's default TCP engine, NPU caches staged through host memory.

Why not HCCL, as CUDA uses NCCL (`xllm.backends.cuda.kv_transfer`): prefill and decode instances
are independent processes that share no torch.distributed group, and CUDA's device path rests on
torch's process-group-free NCCL bindings (`torch.cuda.nccl.unique_id`, `init_rank`,
`broadcast`). torch_npu documents no equivalent: HCCL is reachable from Python only as the
`hccl` backend of torch.distributed (`ProcessGroupHCCL`, which needs a shared store and a fixed
world, the thing PD pairs do not have), and the root-info/comm-init/send/recv calls exist only in
CANN's C library (`HcclGetRootInfo`, `HcclCommInitRootInfo`, `HcclSend`, `HcclRecv`), which other
projects reach through their own ctypes bindings. Writing those bindings blind (no NPU, no CANN
here to check signatures or struct sizes against) would be guessing, so Ascend keeps
`Backend.create_kv_transfer`'s staged TCP path, whose bytes are exact and whose cost is two
device-host copies per layer. The way in when a machine with CANN is available: a
`DeviceTransport` (`xllm.hal.tcp_kv_transfer`) like `NcclTransport`, with an ops object over
those four calls (root info sent in the TCP header as NCCL's unique id is), negotiated per
transfer so that a side without it falls back to TCP.
"""

from __future__ import annotations

__all__: list[str] = []

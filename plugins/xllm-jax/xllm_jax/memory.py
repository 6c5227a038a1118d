"""Memory info for JAX's CPU device: the host's, since that is where its buffers live.

jaxlib's CPU client reports no memory statistics (`Device.memory_stats()` is None), and XLA's CPU
buffers come from the same allocator pool as torch's and every other process's, so the honest
answer is the operating system's available memory.
"""

from __future__ import annotations

from xllm.hal.memory import MemInfo


def host_mem_info(meminfo_path: str = "/proc/meminfo") -> MemInfo:
    """Available and total memory from /proc/meminfo (its values are in KiB)."""
    fields: dict[str, int] = {}
    with open(meminfo_path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                fields[key] = int(parts[0]) * 1024
    return MemInfo(
        free_bytes=fields.get("MemAvailable", fields.get("MemFree", 0)), total_bytes=fields["MemTotal"]
    )

"""Model weights on transparent huge pages: the CPU backend's `place_weights`.

A decode step streams every weight once. Read through 4 KiB pages, that is one TLB miss (a page
walk) per 4 KiB, about 100 000 a step for a 400 MB model; through 2 MiB pages, 200. All weights
go into one anonymous mapping advised for huge pages (`madvise(MADV_HUGEPAGE)`; the kernel then
backs its 2 MiB-aligned ranges with huge pages as the copy touches them, where
/sys/kernel/mm/transparent_hugepage/enabled is ``madvise`` or ``always``). Measured on the 100M
Llama's projections, 2 cores: batch-1 GEMVs 4.27 -> 4.04 ms, 64 rows 41.6 -> 39.1 ms. Where huge
pages are not available the tensors are left as they are.
"""

from __future__ import annotations

import logging
import mmap
from typing import Any

import torch

logger = logging.getLogger("xllm.backends.cpu")

HUGE_PAGE_BYTES = 2 << 20
_ALIGN = 64  # every tensor starts on a cache line


def on_huge_pages(tensors: dict[str, Any]) -> dict[str, Any]:
    """The tensors copied into one huge-page mapping (taken out of `tensors` one by one, so each
    host copy can be freed once copied); the tensors themselves where that cannot be done. Other
    values (a model's `Int8Weight`s) are passed through as they are."""
    sizes = {
        name: _aligned(t.numel() * t.element_size())
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor)
    }
    total = sum(sizes.values())
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or total < HUGE_PAGE_BYTES:
        return {name: tensors.pop(name) for name in list(tensors)}
    # Private and anonymous: a shared one would be shmem, whose huge pages are another setting.
    mapping = mmap.mmap(-1, total + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(advice)
    except OSError as exc:  # THP off ("never") or not in this kernel
        logger.info("weights stay on normal pages: madvise(MADV_HUGEPAGE) failed (%s)", exc)
        mapping.close()
        return {name: tensors.pop(name) for name in list(tensors)}
    arena = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    offset = -arena.data_ptr() % HUGE_PAGE_BYTES
    placed: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        t = tensors.pop(name)
        if name not in sizes:
            placed[name] = t
            continue
        nbytes = t.numel() * t.element_size()
        dst = arena[offset : offset + nbytes].view(t.dtype).view(t.shape)
        dst.copy_(t)
        placed[name] = dst
        offset += sizes[name]
    return placed


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN

"""Memory part of the HAL contract: device memory info and xTensor virtual-memory pages.

An xTensor reserves a large contiguous *virtual* range and backs fixed-size pages of it with
physical memory only when mapped. The KV cache can then be one logically contiguous tensor that
grows and shrinks page by page (the idea of xLLM's xTensor and of vLLM's CuMemAllocator).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from xllm.hal.errors import UnmappedMemoryError


@dataclass(frozen=True, slots=True)
class MemInfo:
    free_bytes: int
    total_bytes: int

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes


class XTensor(ABC):
    """A reserved virtual range of ``num_pages * page_size_bytes`` bytes, mapped page by page.

    Backends implement `_map_page`, `_unmap_page` and `_view_at`; bookkeeping and the checks that
    turn a bad call into an error instead of a crash live here, once.
    """

    def __init__(self, num_pages: int, page_size_bytes: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        if page_size_bytes <= 0:
            raise ValueError(f"page_size_bytes must be positive, got {page_size_bytes}")
        self.num_pages = num_pages
        self.page_size_bytes = page_size_bytes
        self._mapped: set[int] = set()
        self._closed = False

    @property
    def size_bytes(self) -> int:
        return self.num_pages * self.page_size_bytes

    @property
    def num_mapped_pages(self) -> int:
        return len(self._mapped)

    def is_mapped(self, page: int) -> bool:
        return page in self._mapped

    def map(self, first_page: int, num_pages: int = 1) -> None:
        """Backs pages ``[first_page, first_page + num_pages)`` with physical memory (idempotent)."""
        for page in self._page_range(first_page, num_pages):
            if page not in self._mapped:
                self._map_page(page)
                self._mapped.add(page)

    def unmap(self, first_page: int, num_pages: int = 1) -> None:
        """Releases the physical memory of the pages; their contents are lost (idempotent)."""
        for page in self._page_range(first_page, num_pages):
            if page in self._mapped:
                self._unmap_page(page)
                self._mapped.discard(page)

    def view(self, offset_bytes: int, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor over mapped bytes starting at ``offset_bytes``.

        Raises `UnmappedMemoryError` if any byte of it lies in an unmapped page: touching such
        memory would fault the process. The caller must drop views before unmapping their pages.
        """
        self._check_open()
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        if offset_bytes < 0 or offset_bytes % itemsize:
            raise ValueError(
                f"offset_bytes must be a non-negative multiple of {itemsize}, got {offset_bytes}"
            )
        if offset_bytes + nbytes > self.size_bytes:
            raise ValueError(
                f"view of {nbytes} bytes at offset {offset_bytes} exceeds the reserved {self.size_bytes} bytes"
            )
        if nbytes:
            first = offset_bytes // self.page_size_bytes
            last = (offset_bytes + nbytes - 1) // self.page_size_bytes
            missing = [p for p in range(first, last + 1) if p not in self._mapped]
            if missing:
                raise UnmappedMemoryError(
                    f"xTensor pages {missing[:8]}{'...' if len(missing) > 8 else ''} are not mapped; "
                    f"map them before viewing bytes [{offset_bytes}, {offset_bytes + nbytes})"
                )
        return self._view_at(offset_bytes, tuple(shape), dtype)

    def close(self) -> None:
        """Unmaps everything and releases the reservation."""
        if not self._closed:
            self.unmap(0, self.num_pages)
            self._release()
            self._closed = True

    def __enter__(self) -> XTensor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _page_range(self, first_page: int, num_pages: int) -> range:
        self._check_open()
        if num_pages < 0 or first_page < 0 or first_page + num_pages > self.num_pages:
            raise ValueError(
                f"pages [{first_page}, {first_page + num_pages}) are outside the reservation of {self.num_pages} pages"
            )
        return range(first_page, first_page + num_pages)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("xTensor is closed")

    @abstractmethod
    def _map_page(self, page: int) -> None: ...

    @abstractmethod
    def _unmap_page(self, page: int) -> None: ...

    @abstractmethod
    def _view_at(self, offset_bytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...

    @abstractmethod
    def _release(self) -> None: ...


def host_mem_info(meminfo_path: str = "/proc/meminfo") -> MemInfo:
    """Available and total system memory from /proc/meminfo (values there are in KiB): the
    `mem_info` of a backend whose buffers come from host memory."""
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

"""Virtual-memory xTensor on the CPU: an anonymous mmap reservation backed page by page.

The range is reserved with ``PROT_NONE`` and ``MAP_NORESERVE``, so it costs address space but no
memory. Mapping a page makes it readable and writable (the kernel backs it on first touch);
unmapping discards its contents with ``MADV_DONTNEED`` (the resident set shrinks at once) and
makes it inaccessible again, which mirrors cuMemMap / cuMemUnmap on a GPU. libc is called
through ctypes so no extension module is needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os

import torch

from xllm.hal.memory import XTensor

DEFAULT_PAGE_SIZE_BYTES = 2 * 1024 * 1024  # a huge-page-sized unit, as GPU VMM granularity is

# Linux values; the mmap module exposes most of them, PROT_NONE it does not.
PROT_NONE = 0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", 0x20)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
MAP_FAILED = ctypes.c_void_p(-1).value

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mprotect.restype = ctypes.c_int
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = libc
    return _libc


def _check(rc: int, call: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call} failed: {os.strerror(err)}")


class CpuXTensor(XTensor):
    def __init__(self, num_pages: int, page_size_bytes: int | None = None) -> None:
        page_size_bytes = page_size_bytes or DEFAULT_PAGE_SIZE_BYTES
        if page_size_bytes % mmap.PAGESIZE:
            raise ValueError(
                f"page_size_bytes must be a multiple of the OS page size {mmap.PAGESIZE}, got {page_size_bytes}"
            )
        super().__init__(num_pages, page_size_bytes)
        self._libc = _load_libc()
        addr = self._libc.mmap(
            None, self.size_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0
        )
        if addr is None or addr == MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {self.size_bytes} bytes failed: {os.strerror(err)}")
        self.base_address: int = addr

    def _page_address(self, page: int) -> int:
        return self.base_address + page * self.page_size_bytes

    def _map_page(self, page: int) -> None:
        _check(
            self._libc.mprotect(self._page_address(page), self.page_size_bytes, PROT_READ | PROT_WRITE),
            "mprotect",
        )

    def _unmap_page(self, page: int) -> None:
        addr = self._page_address(page)
        # DONTNEED drops the physical pages now (a private anonymous page reads back as zeros);
        # PROT_NONE then turns any stale access into a fault instead of silent reuse.
        _check(self._libc.madvise(addr, self.page_size_bytes, MADV_DONTNEED), "madvise")
        _check(self._libc.mprotect(addr, self.page_size_bytes, PROT_NONE), "mprotect")

    def _view_at(self, offset_bytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        buffer = (ctypes.c_char * nbytes).from_address(self.base_address + offset_bytes)
        return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)

    def _release(self) -> None:
        _check(self._libc.munmap(self.base_address, self.size_bytes), "munmap")

    def __del__(self) -> None:
        # Best effort: return the reservation if the owner forgot close().
        if not getattr(self, "_closed", True) and hasattr(self, "base_address"):
            try:
                self.close()
            except Exception:
                pass

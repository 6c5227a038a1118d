"""CPU memory: mmap-backed xTensor pages (RSS really rises and falls) and mem_info."""

from __future__ import annotations

import mmap

import pytest
import torch

from xllm.backends.cpu.xtensor import DEFAULT_PAGE_SIZE_BYTES, CpuXTensor
from xllm.hal import UnmappedMemoryError

MiB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_reserve_costs_no_memory_and_map_touch_unmap_moves_rss(cpu):
    xt = cpu.create_xtensor(num_pages=64)  # 128 MiB of address space
    try:
        assert xt.page_size_bytes == DEFAULT_PAGE_SIZE_BYTES and xt.num_mapped_pages == 0
        base = rss_bytes()
        xt.map(0, 16)  # 32 MiB
        view = xt.view(0, (16 * DEFAULT_PAGE_SIZE_BYTES // 4,), torch.float32)
        view.fill_(1.5)
        touched = rss_bytes()
        assert touched - base >= 24 * MiB, f"RSS rose by only {(touched - base) / MiB:.1f} MiB"
        del view
        xt.unmap(0, 16)
        assert touched - rss_bytes() >= 24 * MiB, "RSS did not drop after unmap"
        assert xt.num_mapped_pages == 0
    finally:
        xt.close()


def test_data_survives_in_mapped_pages_and_remap_is_zeroed(cpu):
    page = 64 * 1024
    with cpu.create_xtensor(num_pages=8, page_size_bytes=page) as xt:
        xt.map(2, 3)
        a = xt.view(2 * page, (3 * page // 2,), torch.bfloat16)
        a.copy_(torch.arange(a.numel()).to(torch.bfloat16))
        b = xt.view(2 * page, (3 * page // 2,), torch.bfloat16)
        assert torch.equal(a, b)
        # A view at an offset sees the same bytes.
        tail = xt.view(3 * page, (page // 2,), torch.bfloat16)
        assert torch.equal(tail, a[page // 2 : page])
        del a, b, tail
        xt.unmap(3)
        xt.map(3)
        assert not xt.view(3 * page, (page // 4,), torch.float32).any()  # fresh page reads as zeros
        assert xt.view(2 * page, (4,), torch.bfloat16).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_view_over_unmapped_pages_raises_instead_of_faulting(cpu):
    page = mmap.PAGESIZE * 4
    with cpu.create_xtensor(num_pages=4, page_size_bytes=page) as xt:
        with pytest.raises(UnmappedMemoryError):
            xt.view(0, (4,), torch.float32)
        xt.map(0)
        xt.view(0, (page // 4,), torch.float32).fill_(1)
        with pytest.raises(UnmappedMemoryError):  # spills one element into page 1
            xt.view(0, (page // 4 + 1,), torch.float32)
        xt.unmap(0)
        with pytest.raises(UnmappedMemoryError):
            xt.view(0, (1,), torch.float32)
    with pytest.raises(RuntimeError, match="closed"):
        xt.view(0, (1,), torch.float32)


def test_page_size_must_be_a_multiple_of_the_os_page(cpu):
    with pytest.raises(ValueError, match="page_size_bytes"):
        CpuXTensor(2, mmap.PAGESIZE + 1)
    with pytest.raises(ValueError, match="outside"):
        with cpu.create_xtensor(2, mmap.PAGESIZE) as xt:
            xt.map(1, 2)


def test_mem_info_reads_proc_meminfo(cpu):
    info = cpu.mem_info()
    assert 0 < info.free_bytes <= info.total_bytes
    assert info.used_bytes >= 0


def test_allocate_kv_cache_layout(cpu):
    caches = cpu.allocate_kv_cache(2, 5, 16, 2, 8, torch.bfloat16)
    assert len(caches) == 2
    k, v = caches[0]
    assert k.shape == (5, 16, 2, 8) and k.dtype == torch.bfloat16 and not k.any()
    assert k.data_ptr() != v.data_ptr()

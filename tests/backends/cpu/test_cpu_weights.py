"""The CPU backend's `place_weights`: every weight copied into one huge-page mapping, unchanged."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from xllm.backends.cpu.weights import HUGE_PAGE_BYTES, on_huge_pages


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0]


def test_weights_keep_their_values_shapes_and_dtypes_and_the_host_copies_are_released() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(1024, 768, generator=g),
        "strided": torch.randn(700, 1000, generator=g)[:, :333],
        "q": torch.randint(-128, 127, (513, 77), dtype=torch.int8, generator=g),
        "scale": torch.rand(513, 3, generator=g),
    }
    want = {name: t.clone() for name, t in tensors.items()}
    int8_weight = object()  # stands for a model's Int8Weight: not a tensor, passed through as is
    tensors["int8"] = int8_weight
    placed = on_huge_pages(tensors)
    assert placed.pop("int8") is int8_weight
    assert not tensors  # taken out one by one: the host copies are freed as they are copied
    for name, t in want.items():
        assert placed[name].dtype == t.dtype and torch.equal(placed[name], t), name
        assert placed[name].is_contiguous() and placed[name].data_ptr() % 64 == 0, name
    if getattr(mmap, "MADV_HUGEPAGE", None) is not None:
        # One mapping, starting on a huge-page boundary, in the order given.
        first = placed["w"].data_ptr()
        assert first % HUGE_PAGE_BYTES == 0
        assert placed["strided"].data_ptr() > first and placed["scale"].data_ptr() > placed["q"].data_ptr()


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off here")
def test_the_mapping_is_backed_by_huge_pages() -> None:
    placed = on_huge_pages({"w": torch.ones(4 * HUGE_PAGE_BYTES // 4)})
    start = placed["w"].data_ptr()
    for line_no, line in enumerate(lines := Path("/proc/self/smaps").read_text().splitlines()):
        lo, _, hi = line.partition(" ")[0].partition("-")
        if hi and all(c in "0123456789abcdef" for c in lo + hi) and int(lo, 16) <= start < int(hi, 16):
            fields = dict(entry.split(":", 1) for entry in lines[line_no + 1 : line_no + 30] if ":" in entry)
            assert int(fields["AnonHugePages"].split()[0]) > 0, fields["AnonHugePages"]
            return
    pytest.fail("the weights' mapping is not in /proc/self/smaps")


def test_small_models_stay_where_they_are() -> None:
    t = torch.ones(10)
    assert on_huge_pages({"t": t})["t"] is t

"""ACL virtual-memory bindings: struct layouts as in CANN's acl_rt.h, and the xTensor's call
sequence (reserve once, MallocPhysical + MapMem per page, UnmapMem + FreePhysical, release)
checked against a recording stand-in for libascendcl.so. Real mapping runs in test_npu.py."""

from __future__ import annotations

import ctypes

import pytest
import torch

from xllm.backends.ascend import acl
from xllm.hal import UnmappedMemoryError

GRANULARITY = 2 * 1024 * 1024


def test_physical_mem_prop_layout_matches_acl_rt_h():
    # struct { enum handleType; enum allocationType; enum memAttr;
    #          struct { uint32_t id; enum type; } location; uint64_t reserve; }
    p = acl.AclrtPhysicalMemProp
    assert [(name, getattr(p, name).offset) for name, _ in p._fields_] == [
        ("handleType", 0),
        ("allocationType", 4),
        ("memAttr", 8),
        ("location", 12),
        ("reserve", 24),  # uint64 aligned to 8 after the 8-byte location at 12
    ]
    assert ctypes.sizeof(p) == 32
    assert ctypes.sizeof(acl.AclrtMemLocation) == 8


def test_device_mem_prop_values():
    prop = acl.device_mem_prop(3)
    assert (prop.handleType, prop.allocationType, prop.memAttr) == (0, 0, acl.ACL_HBM_MEM_HUGE)
    assert acl.ACL_HBM_MEM_HUGE == 4  # DDR, HBM, DDR_HUGE, DDR_NORMAL, HBM_HUGE
    assert (prop.location.id, prop.location.type) == (3, acl.ACL_MEM_LOCATION_TYPE_DEVICE)


class RecordingAcl:
    """Stands in for libascendcl.so: hands out fake addresses/handles and records each call."""

    def __init__(self, fail_map: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail_map = fail_map
        self._next_handle = 100

    def aclrtMemGetAllocationGranularity(self, prop_ref, option, out_ref):
        self.calls.append(("granularity", prop_ref._obj.location.id, option))
        out_ref._obj.value = GRANULARITY
        return 0

    def aclrtReserveMemAddress(self, ptr_ref, size, alignment, expect, flags):
        self.calls.append(("reserve", size, alignment, expect, flags))
        ptr_ref._obj.value = 0x10_0000_0000
        return 0

    def aclrtMallocPhysical(self, handle_ref, size, prop_ref, flags):
        self._next_handle += 1
        handle_ref._obj.value = self._next_handle
        self.calls.append(("malloc", size, prop_ref._obj.memAttr, self._next_handle))
        return 0

    def aclrtMapMem(self, addr, size, offset, handle, flags):
        self.calls.append(("map", addr.value, size, offset, handle.value))
        return 507899 if self.fail_map else 0

    def aclrtUnmapMem(self, addr):
        self.calls.append(("unmap", addr.value))
        return 0

    def aclrtFreePhysical(self, handle):
        self.calls.append(("free", handle.value))
        return 0

    def aclrtReleaseMemAddress(self, addr):
        self.calls.append(("release", addr.value))
        return 0


def fake_tensor(address, shape, dtype, device):
    t = torch.zeros(shape, dtype=dtype)
    t.fake_address = address  # what the real factory would alias
    return t


def make(lib, num_pages=4, page=GRANULARITY):
    return acl.AclXTensor(acl.AclRuntime(lib), num_pages, page, 0, fake_tensor, torch.device("cpu"))


def test_xtensor_call_sequence():
    lib = RecordingAcl()
    base = 0x10_0000_0000
    with make(lib) as xt:
        assert lib.calls[:2] == [("granularity", 0, 0), ("reserve", 4 * GRANULARITY, 0, None, 0)]
        xt.map(1, 2)
        assert lib.calls[2:] == [
            ("malloc", GRANULARITY, acl.ACL_HBM_MEM_HUGE, 101),
            ("map", base + GRANULARITY, GRANULARITY, 0, 101),
            ("malloc", GRANULARITY, acl.ACL_HBM_MEM_HUGE, 102),
            ("map", base + 2 * GRANULARITY, GRANULARITY, 0, 102),
        ]
        view = xt.view(GRANULARITY + 64, (16,), torch.float32)
        assert view.fake_address == base + GRANULARITY + 64
        with pytest.raises(UnmappedMemoryError):
            xt.view(0, (4,), torch.float32)
        xt.unmap(1)
        assert lib.calls[-2:] == [("unmap", base + GRANULARITY), ("free", 101)]
    # close: the remaining page is unmapped and freed, then the range is released.
    assert lib.calls[-3:] == [("unmap", base + 2 * GRANULARITY), ("free", 102), ("release", base)]


def test_failed_map_frees_the_physical_page():
    lib = RecordingAcl(fail_map=True)
    xt = make(lib)
    with pytest.raises(acl.AclError, match="aclrtMapMem failed with aclError 507899"):
        xt.map(0)
    assert lib.calls[-1] == ("free", 101)
    assert not xt.is_mapped(0)


def test_page_size_must_be_a_multiple_of_the_granularity():
    with pytest.raises(ValueError, match="multiple of the ACL granularity"):
        make(RecordingAcl(), page=GRANULARITY + 4096)


def test_tensor_factory_uses_torch_npu_storage_helpers():
    seen = {}

    class C:
        @staticmethod
        def _construct_storage_from_data_pointer(ptr, device, nbytes):
            seen["storage"] = (ptr, device, nbytes)
            return "storage"

        @staticmethod
        def _construct_NPU_Tensor_From_Storage_And_Metadata(metadata, storage):
            seen["metadata"] = (metadata, storage)
            return "tensor"

    class Npu:
        _C = C

    make_tensor = acl.torch_npu_tensor_factory(Npu)
    assert make_tensor(4096, (2, 3), torch.float16, "npu:0") == "tensor"
    assert seen["storage"] == (4096, "npu:0", 12)
    metadata, storage = seen["metadata"]
    assert storage == "storage"
    assert metadata["size"] == (2, 3) and metadata["stride"] == (3, 1) and metadata["dtype"] == torch.float16
    assert metadata["data_ptr"] == 4096 and metadata["storage_offset"] == 0

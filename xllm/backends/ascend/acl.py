"""ctypes bindings to CANN's virtual-memory API in libascendcl.so, and the xTensor built on them.

ACL mirrors CUDA's VMM: `aclrtReserveMemAddress` reserves a virtual range, `aclrtMallocPhysical`
creates a physical allocation described by an `aclrtPhysicalMemProp`, `aclrtMapMem` /
`aclrtUnmapMem` back or un-back part of the range, `aclrtFreePhysical` and
`aclrtReleaseMemAddress` give both back. Struct layouts and enum values are declared from CANN's
``acl/acl_rt.h``; a test pins their sizes and offsets.

Tensors over the mapped range: torch_npu has no ``__cuda_array_interface__``/DLPack import for
raw device pointers, so views are built with the helpers Huawei's own shmem package uses,
``torch_npu._C._construct_storage_from_data_pointer`` (a storage that does not own the memory)
and ``torch_npu._C._construct_NPU_Tensor_From_Storage_And_Metadata``. Both are private, so the
constructor is injected (`TensorFactory`) and the backend checks they exist before reporting
virtual-memory support at run time.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from typing import Any

import torch

from xllm.hal.memory import XTensor

ACL_SUCCESS = 0
# aclrtMemHandleType
ACL_MEM_HANDLE_TYPE_NONE = 0
# aclrtMemAllocationType
ACL_MEM_ALLOCATION_TYPE_PINNED = 0
# aclrtMemAttr (enum order of acl_rt.h: DDR, HBM, DDR_HUGE, DDR_NORMAL, HBM_HUGE, ...)
ACL_HBM_MEM_HUGE = 4
# aclrtMemLocationType
ACL_MEM_LOCATION_TYPE_DEVICE = 1
# aclrtMemGranularityOptions
ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM = 0
ACL_RT_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1


class AclrtMemLocation(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("type", ctypes.c_int)]  # enum aclrtMemLocationType


class AclrtPhysicalMemProp(ctypes.Structure):
    _fields_ = [
        ("handleType", ctypes.c_int),  # aclrtMemHandleType
        ("allocationType", ctypes.c_int),  # aclrtMemAllocationType
        ("memAttr", ctypes.c_int),  # aclrtMemAttr
        ("location", AclrtMemLocation),
        ("reserve", ctypes.c_uint64),
    ]


def device_mem_prop(device_index: int) -> AclrtPhysicalMemProp:
    """Huge-page HBM on one device, pinned, not shareable: what vllm-ascend's allocator uses."""
    prop = AclrtPhysicalMemProp()
    prop.handleType = ACL_MEM_HANDLE_TYPE_NONE
    prop.allocationType = ACL_MEM_ALLOCATION_TYPE_PINNED
    prop.memAttr = ACL_HBM_MEM_HUGE
    prop.location.id = device_index
    prop.location.type = ACL_MEM_LOCATION_TYPE_DEVICE
    prop.reserve = 0
    return prop


class AclError(RuntimeError):
    """An ACL runtime call returned a non-zero aclError."""


class AclRuntime:
    """The handful of ACL calls the xTensor needs, typed; `lib` is libascendcl.so (or a stand-in)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        if isinstance(lib, ctypes.CDLL):
            self._declare(lib)

    @staticmethod
    def _declare(lib: ctypes.CDLL) -> None:
        vp, sz, u64, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int
        prop_p = ctypes.POINTER(AclrtPhysicalMemProp)
        signatures = {
            # aclError aclrtReserveMemAddress(void **virPtr, size_t size, size_t alignment, void *expectPtr, uint64_t flags)
            "aclrtReserveMemAddress": [ctypes.POINTER(vp), sz, sz, vp, u64],
            "aclrtReleaseMemAddress": [vp],
            # aclError aclrtMallocPhysical(aclrtDrvMemHandle *handle, size_t size, const aclrtPhysicalMemProp *prop, uint64_t flags)
            "aclrtMallocPhysical": [ctypes.POINTER(vp), sz, prop_p, u64],
            "aclrtFreePhysical": [vp],
            # aclError aclrtMapMem(void *virPtr, size_t size, size_t offset, aclrtDrvMemHandle handle, uint64_t flags)
            "aclrtMapMem": [vp, sz, sz, vp, u64],
            "aclrtUnmapMem": [vp],
            # aclError aclrtMemGetAllocationGranularity(aclrtPhysicalMemProp *prop, aclrtMemGranularityOptions option, size_t *granularity)
            "aclrtMemGetAllocationGranularity": [prop_p, i32, ctypes.POINTER(sz)],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int

    def _check(self, name: str, code: int) -> None:
        if code != ACL_SUCCESS:
            raise AclError(f"{name} failed with aclError {code}")

    def granularity(self, device_index: int) -> int:
        prop = device_mem_prop(device_index)
        out = ctypes.c_size_t(0)
        self._check(
            "aclrtMemGetAllocationGranularity",
            self.lib.aclrtMemGetAllocationGranularity(
                ctypes.byref(prop), ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM, ctypes.byref(out)
            ),
        )
        return int(out.value)

    def reserve(self, size: int) -> int:
        ptr = ctypes.c_void_p(0)
        # alignment 0 = the default granularity; expectPtr must be NULL; flags 0 = default pages.
        self._check(
            "aclrtReserveMemAddress", self.lib.aclrtReserveMemAddress(ctypes.byref(ptr), size, 0, None, 0)
        )
        return int(ptr.value or 0)

    def release(self, address: int) -> None:
        self._check("aclrtReleaseMemAddress", self.lib.aclrtReleaseMemAddress(ctypes.c_void_p(address)))

    def malloc_physical(self, size: int, device_index: int) -> int:
        handle = ctypes.c_void_p(0)
        prop = device_mem_prop(device_index)
        self._check(
            "aclrtMallocPhysical",
            self.lib.aclrtMallocPhysical(ctypes.byref(handle), size, ctypes.byref(prop), 0),
        )
        return int(handle.value or 0)

    def free_physical(self, handle: int) -> None:
        self._check("aclrtFreePhysical", self.lib.aclrtFreePhysical(ctypes.c_void_p(handle)))

    def map(self, address: int, size: int, handle: int) -> None:
        self._check(
            "aclrtMapMem", self.lib.aclrtMapMem(ctypes.c_void_p(address), size, 0, ctypes.c_void_p(handle), 0)
        )

    def unmap(self, address: int) -> None:
        self._check("aclrtUnmapMem", self.lib.aclrtUnmapMem(ctypes.c_void_p(address)))


# (address, shape, dtype, device) -> a tensor aliasing device memory it does not own
TensorFactory = Callable[[int, tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def torch_npu_tensor_factory(npu: Any) -> TensorFactory:
    """Tensor-from-pointer through torch_npu's storage helpers (see the module docstring)."""
    construct_storage = npu._C._construct_storage_from_data_pointer
    construct_tensor = npu._C._construct_NPU_Tensor_From_Storage_And_Metadata

    def make(address: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        stride, acc = [], 1
        for dim in reversed(shape):
            stride.append(acc)
            acc *= dim
        metadata = {
            "data_ptr": address,
            "device": device,
            "nbytes": nbytes,
            "dtype": dtype,
            "size": tuple(shape),
            "stride": tuple(reversed(stride)),
            "storage_offset": 0,
        }
        storage = construct_storage(address, device, nbytes)
        return construct_tensor(metadata, storage)

    return make


class AclXTensor(XTensor):
    """A reserved ACL virtual range; each mapped page owns one physical allocation."""

    def __init__(
        self,
        runtime: AclRuntime,
        num_pages: int,
        page_size_bytes: int,
        device_index: int,
        make_tensor: TensorFactory,
        device: torch.device,
    ) -> None:
        super().__init__(num_pages, page_size_bytes)
        granularity = runtime.granularity(device_index)
        if granularity and page_size_bytes % granularity:
            raise ValueError(
                f"page_size_bytes {page_size_bytes} must be a multiple of the ACL granularity {granularity}"
            )
        self._rt = runtime
        self._device_index = device_index
        self._make_tensor = make_tensor
        self._device = device
        self._handles: dict[int, int] = {}  # page -> aclrtDrvMemHandle
        self.base_address = runtime.reserve(self.size_bytes)

    def _map_page(self, page: int) -> None:
        handle = self._rt.malloc_physical(self.page_size_bytes, self._device_index)
        try:
            self._rt.map(self.base_address + page * self.page_size_bytes, self.page_size_bytes, handle)
        except AclError:
            self._rt.free_physical(handle)  # don't leak the page when the mapping fails
            raise
        self._handles[page] = handle

    def _unmap_page(self, page: int) -> None:
        self._rt.unmap(self.base_address + page * self.page_size_bytes)
        self._rt.free_physical(self._handles.pop(page))

    def _view_at(self, offset_bytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._make_tensor(self.base_address + offset_bytes, shape, dtype, self._device)

    def _release(self) -> None:
        self._rt.release(self.base_address)

"""xTensor over the CUDA virtual memory management API (cuda-python driver bindings).

A reservation is one ``cuMemAddressReserve`` range; mapping page p creates a physical allocation
with ``cuMemCreate``, maps it at ``base + p * page_size`` with ``cuMemMap`` and grants this device
read/write access with ``cuMemSetAccess``; unmapping undoes both (``cuMemUnmap`` +
``cuMemRelease``), and closing frees the range (``cuMemAddressFree``). Views are torch tensors over
the mapped addresses, built from a ``__cuda_array_interface__`` so torch takes the pointer as is.
Pages must be multiples of the allocation granularity (2 MiB on current GPUs); a requested page
size is rounded up to it. This is the mechanism of xLLM's xTensor and vLLM's CuMemAllocator.
"""

from __future__ import annotations

from typing import Any

import torch

from xllm.hal import XTensor


def load_driver() -> Any:
    """The cuda-python driver module: ``cuda.bindings.driver`` (cuda-python >= 12.6) or the older
    ``cuda.cuda``. Imported lazily so that the backend imports without cuda-python."""
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # type: ignore[no-redef]
    return driver


def _check(driver: Any, result: Any, call: str) -> Any:
    """Unpacks a cuda-python ``(CUresult, *values)`` tuple, raising on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, text = driver.cuGetErrorString(err)
        raise RuntimeError(f"{call} failed: {err!r} ({text.decode() if isinstance(text, bytes) else text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class _DeviceBuffer:
    """Presents ``nbytes`` at a device address to torch through the CUDA array interface."""

    def __init__(self, ptr: int, nbytes: int, owner: XTensor) -> None:
        self._owner = owner  # the reservation must outlive every tensor viewing it
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


class CudaXTensor(XTensor):
    def __init__(self, num_pages: int, page_size_bytes: int | None, device_index: int) -> None:
        self._driver = driver = load_driver()
        self.device = torch.device("cuda", device_index)
        # Make the device's primary context current on this thread: the driver calls below act
        # on the current context, and torch initialises it lazily.
        torch.cuda.set_device(self.device)
        torch.cuda.synchronize(self.device)
        _check(driver, driver.cuInit(0), "cuInit")

        prop = driver.CUmemAllocationProp()
        prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device_index
        self._prop = prop
        granularity = int(
            _check(
                driver,
                driver.cuMemGetAllocationGranularity(
                    prop, driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
                "cuMemGetAllocationGranularity",
            )
        )
        self.granularity = granularity
        requested = granularity if page_size_bytes is None else int(page_size_bytes)
        if requested <= 0:
            raise ValueError(f"page_size_bytes must be positive, got {page_size_bytes}")
        page = -(-requested // granularity) * granularity
        super().__init__(num_pages, page)

        access = driver.CUmemAccessDesc()
        access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device_index
        access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self._base = int(
            _check(
                driver, driver.cuMemAddressReserve(self.size_bytes, granularity, 0, 0), "cuMemAddressReserve"
            )
        )
        self._handles: dict[int, Any] = {}  # page -> its physical allocation handle

    def _page_ptr(self, page: int) -> Any:
        return self._driver.CUdeviceptr(self._base + page * self.page_size_bytes)

    def _map_page(self, page: int) -> None:
        d = self._driver
        handle = _check(d, d.cuMemCreate(self.page_size_bytes, self._prop, 0), "cuMemCreate")
        try:
            _check(d, d.cuMemMap(self._page_ptr(page), self.page_size_bytes, 0, handle, 0), "cuMemMap")
        except Exception:
            d.cuMemRelease(handle)
            raise
        try:
            _check(
                d,
                d.cuMemSetAccess(self._page_ptr(page), self.page_size_bytes, [self._access], 1),
                "cuMemSetAccess",
            )
        except Exception:
            d.cuMemUnmap(self._page_ptr(page), self.page_size_bytes)
            d.cuMemRelease(handle)
            raise
        self._handles[page] = handle

    def _unmap_page(self, page: int) -> None:
        d = self._driver
        # Work queued on the device may still read the page; unmapping under it would fault.
        torch.cuda.synchronize(self.device)
        _check(d, d.cuMemUnmap(self._page_ptr(page), self.page_size_bytes), "cuMemUnmap")
        _check(d, d.cuMemRelease(self._handles.pop(page)), "cuMemRelease")

    def _view_at(self, offset_bytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = itemsize
        for n in shape:
            nbytes *= n
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=self.device)
        raw = torch.as_tensor(_DeviceBuffer(self._base + offset_bytes, nbytes, self), device=self.device)
        # Go through bytes so dtypes without a typestr (bfloat16) work too.
        return raw.view(dtype).view(shape)

    def _release(self) -> None:
        d = self._driver
        _check(
            d, d.cuMemAddressFree(self._driver.CUdeviceptr(self._base), self.size_bytes), "cuMemAddressFree"
        )

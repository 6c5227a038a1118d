"""`Backend.is_fatal_error`: which step failures mean the device is lost, per backend.

The CUDA and Ascend classifiers only read exception types and messages, so they are checked here
on any machine with errors worded as torch, Triton and torch_npu word them; the backends are
created without running their constructors (which would need the device).
"""

from __future__ import annotations

import pytest
import torch

from xllm.backends.ascend.backend import AscendBackend
from xllm.backends.cuda.backend import CudaBackend
from xllm.hal import DeviceFaultError, get_backend


def chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


def test_default_only_device_fault_error_is_fatal() -> None:
    cpu = get_backend("cpu")
    assert cpu.is_fatal_error(DeviceFaultError("device lost"))
    # Anywhere in the chain: a backend or the model may wrap it.
    assert cpu.is_fatal_error(chained(RuntimeError("step failed"), DeviceFaultError("gone")))
    context = ValueError("while handling")
    context.__context__ = DeviceFaultError("gone")
    assert cpu.is_fatal_error(context)
    assert not cpu.is_fatal_error(RuntimeError("shape mismatch"))
    assert not cpu.is_fatal_error(torch.OutOfMemoryError("out of memory"))
    # The default backend knows no runtime's words: only the explicit class counts.
    assert not cpu.is_fatal_error(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_chain_walk_ends_on_a_cycle_and_respects_from_none() -> None:
    cpu = get_backend("cpu")
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert not cpu.is_fatal_error(a)
    hidden = RuntimeError("raised from None")
    hidden.__context__ = DeviceFaultError("gone")
    hidden.__suppress_context__ = True
    assert not cpu.is_fatal_error(hidden)


@pytest.fixture
def cuda() -> CudaBackend:
    return object.__new__(CudaBackend)  # classification needs no GPU and no kernels


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...",
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
        "CUDA error: misaligned address",
        "CUDA error: uncorrectable ECC error encountered",
        "Triton Error [CUDA]: an illegal memory access was encountered",
        "CUDA error: the launch timed out and was terminated",
        "Unable to determine the device handle for GPU0000:3B:00.0: GPU is lost",
    ],
)
def test_cuda_sticky_errors_are_fatal(cuda: CudaBackend, message: str) -> None:
    assert cuda.is_fatal_error(RuntimeError(message))
    assert cuda.is_fatal_error(chained(RuntimeError("model step failed"), RuntimeError(message)))


def test_cuda_error_code_decides_when_present(cuda: CudaBackend) -> None:
    illegal = torch.AcceleratorError("CUDA error")
    illegal.error_code = 700  # type: ignore[attr-defined]  # cudaErrorIllegalAddress
    assert cuda.is_fatal_error(illegal)
    oom = torch.AcceleratorError("CUDA error: out of memory")
    oom.error_code = 2  # type: ignore[attr-defined]  # cudaErrorMemoryAllocation
    assert not cuda.is_fatal_error(oom)


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("CUDA error: invalid argument"),
        RuntimeError("CUDA error: too many resources requested for launch"),
        ValueError("misaligned address"),  # not a runtime error: the words alone do not count
    ],
)
def test_cuda_recoverable_errors_are_not_fatal(cuda: CudaBackend, exc: BaseException) -> None:
    assert not cuda.is_fatal_error(exc)


@pytest.fixture
def ascend() -> AscendBackend:
    return object.__new__(AscendBackend)  # no torch_npu needed to classify


@pytest.mark.parametrize(
    "message",
    [
        "synchronize:build/CMakeFiles/torch_npu.dir/compiler_depend.ts:467 NPU function error: "
        "AclrtSynchronizeDeviceWithTimeout, error code is 507015\n[ERROR] 2025-01-01 EZ9999: Inner Error!",
        "NPU function error: c10_npu::acl::AclrtSynchronizeStreamWithTimeout(stream), error code is 507035",
        "NPU error, error code is 507053",
        "NPU function error: reason=[device mem error], error code is 507053",
        "NPU function error: reason=[hbm Multi-bit ECC error], error code is 507054",
        "NPU function error: UCE ERROR, error code is 507053",
        "NPU function error: FORCE STOP, error code is 107022",
        "aclrtMapMem failed with aclError 507899",
    ],
)
def test_ascend_device_errors_are_fatal(ascend: AscendBackend, message: str) -> None:
    assert ascend.is_fatal_error(RuntimeError(message))


@pytest.mark.parametrize(
    "message",
    [
        "NPU out of memory. Tried to allocate 2.00 GiB",
        "EL0004: [PID: 1] 2025-01-01 Failed to allocate memory.",
        "NPU function error: aclrtMalloc, error code is 207001",
        "NPU function error: aclrtMalloc, error code is 207018",
        "EZ9999: Inner Error! The input shape is not supported",  # generic, judged by its code
        "npu_fused_infer_attention_score: argument 'actual_seq_lengths' is invalid",
    ],
)
def test_ascend_recoverable_errors_are_not_fatal(ascend: AscendBackend, message: str) -> None:
    assert not ascend.is_fatal_error(RuntimeError(message))

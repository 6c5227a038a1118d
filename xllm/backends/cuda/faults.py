"""Which CUDA errors leave the device unusable, for `CudaBackend._is_fatal_error`.

CUDA has two kinds of runtime error. Most (out of memory, an invalid argument, too many
resources for a launch) belong to the call that raised them: the context is intact and the next
step can succeed. The "sticky" ones (an illegal address, a device-side assert, a launch failure)
poison the context: every later CUDA call in the process fails with the same error, so the only
cure is a new process. Hardware faults (uncorrectable ECC, a GPU that fell off the bus) are
worse still. The engine stops at once on the second kind instead of failing request after request.

The codes are `cudaError_t` values (driver_types.h); torch >= 2.8 raises `torch.AcceleratorError`
with the code in `error_code`. Older torch, and Triton, report only the message, so the messages
(`cudaGetErrorString` texts) are matched too. Pure Python: nothing here touches the GPU.
"""

from __future__ import annotations

# cudaError_t values after which the context (or the device) cannot be used again.
FATAL_CUDA_ERROR_CODES: frozenset[int] = frozenset(
    {
        46,  # cudaErrorDevicesUnavailable
        100,  # cudaErrorNoDevice
        214,  # cudaErrorECCUncorrectable
        220,  # cudaErrorNvlinkUncorrectable
        700,  # cudaErrorIllegalAddress
        702,  # cudaErrorLaunchTimeout
        709,  # cudaErrorContextIsDestroyed
        710,  # cudaErrorAssert (device-side assert)
        714,  # cudaErrorHardwareStackError
        715,  # cudaErrorIllegalInstruction
        716,  # cudaErrorMisalignedAddress
        717,  # cudaErrorInvalidAddressSpace
        718,  # cudaErrorInvalidPc
        719,  # cudaErrorLaunchFailure
    }
)

# The same errors as their messages read (lower case), plus the driver's words for a lost GPU.
FATAL_CUDA_MESSAGES: tuple[str, ...] = (
    "an illegal memory access was encountered",
    "device-side assert triggered",
    "unspecified launch failure",
    "an illegal instruction was encountered",
    "misaligned address",
    "invalid program counter",
    "hardware stack error",
    "operation not supported on global/shared address space",
    "the launch timed out and was terminated",
    "context is destroyed",
    "uncorrectable ecc error",
    "uncorrectable nvlink error",
    "cuda-capable device(s) is/are busy or unavailable",
    "no cuda-capable device is detected",
    "gpu has fallen off the bus",
    "gpu is lost",
)


def is_fatal_cuda_error(exc: BaseException) -> bool:
    """True for one exception (not its causes) that says the CUDA context or device is lost.

    Out-of-memory is not fatal: the caching allocator raises it before anything ran, and failing
    the step's requests frees what they held (a persistent OOM still stops the engine through its
    consecutive-failure limit).
    """
    code = getattr(exc, "error_code", None)
    if isinstance(code, int) and code in FATAL_CUDA_ERROR_CODES:
        return True
    if not isinstance(exc, RuntimeError):  # torch and Triton report device errors as RuntimeError
        return False
    message = str(exc).lower()
    return any(fragment in message for fragment in FATAL_CUDA_MESSAGES)

"""Which Ascend (ACL / torch_npu) errors leave the NPU unusable, for `AscendBackend._is_fatal_error`.

torch_npu turns a failed ACL call into a RuntimeError whose message carries the ACL runtime
error code ("NPU function error: ..., error code is 507015"), and its fault-tolerance layer
words the hardware faults it recognises ("UCE ERROR", "FORCE STOP", "reason=[device mem error]",
"reason=[hbm Multi-bit ECC error]", ...). The codes are CANN's `rt_error_codes.h` values. An AI
core / vector core exception, a lost heartbeat, a memory (UCE/ECC) error or a task abort leaves
the device's streams in an error state that no later call clears; out of memory (207001, 207018,
"EL0004") and operator argument errors do not. CANN's generic "EZ9999: Inner Error!" accompanies
both kinds, so it is judged by the runtime code next to it, never by itself.

Pure Python: torch_npu is not imported here, so this is testable on any machine.
"""

from __future__ import annotations

import re

# ACL runtime error codes (rt_error_codes.h) after which the device or its context is lost.
FATAL_ACL_ERROR_CODES: frozenset[int] = frozenset(
    {
        107022,  # ACL_ERROR_RT_DEVICE_TASK_ABORT (torch_npu: "FORCE STOP")
        207004,  # ACL_ERROR_RT_NO_DEVICE
        507010,  # ACL_ERROR_RT_LOST_HEARTBEAT
        507013,  # ACL_ERROR_RT_SYS_DMA
        507014,  # ACL_ERROR_RT_AICORE_TIMEOUT
        507015,  # ACL_ERROR_RT_AICORE_EXCEPTION
        507016,  # ACL_ERROR_RT_AICORE_TRAP_EXCEPTION
        507017,  # ACL_ERROR_RT_AICPU_TIMEOUT
        507018,  # ACL_ERROR_RT_AICPU_EXCEPTION
        507034,  # ACL_ERROR_RT_VECTOR_CORE_TIMEOUT
        507035,  # ACL_ERROR_RT_VECTOR_CORE_EXCEPTION
        507036,  # ACL_ERROR_RT_VECTOR_CORE_TRAP_EXCEPTION
        507042,  # ACL_ERROR_RT_AICORE_TRAP_READ_OVERFLOW
        507043,  # ACL_ERROR_RT_AICORE_TRAP_WRITE_OVERFLOW
        507044,  # ACL_ERROR_RT_VECTOR_CORE_TRAP_READ_OVERFLOW
        507045,  # ACL_ERROR_RT_VECTOR_CORE_TRAP_WRITE_OVERFLOW
        507048,  # ACL_ERROR_RT_FFTS_PLUS_TIMEOUT
        507049,  # ACL_ERROR_RT_FFTS_PLUS_EXCEPTION
        507050,  # ACL_ERROR_RT_FFTS_PLUS_TRAP_EXCEPTION
        507053,  # ACL_ERROR_RT_DEVICE_MEM_ERROR (UCE)
        507054,  # ACL_ERROR_RT_HBM_MULTI_BIT_ECC_ERROR
        507055,  # ACL_ERROR_RT_SUSPECT_DEVICE_MEM_ERROR
        507056,  # ACL_ERROR_RT_LINK_ERROR
        507057,  # ACL_ERROR_RT_SUSPECT_REMOTE_ERROR
        507899,  # ACL_ERROR_RT_DRV_INTERNAL_ERROR
        507901,  # ACL_ERROR_RT_SOCKET_CLOSE (host-device channel gone)
        507904,  # ACL_ERROR_RT_COMM_OP_RETRY_FAIL
    }
)

# torch_npu's own words for the faults above (NPUException.h), lower case.
FATAL_NPU_MESSAGES: tuple[str, ...] = (
    "uce error",
    "force stop",
    "reason=[device task abort]",
    "reason=[device mem error]",
    "reason=[hbm multi-bit ecc error]",
    "reason=[suspect device mem error]",
    "reason=[link error]",
    "reason=[hccl op retry failed]",
    "device lost",
)

# "error code is 507015" (torch_npu's NPU_CHECK_ERROR) or "aclError 507015" (our `acl.AclError`).
_ACL_CODE = re.compile(r"(?:error code is|error code:|aclerror)\s*(\d{6})")


def is_fatal_npu_error(exc: BaseException) -> bool:
    """True for one exception (not its causes) that says the NPU or its context is lost."""
    if not isinstance(exc, RuntimeError):  # torch_npu and `acl.AclError` raise RuntimeErrors
        return False
    message = str(exc).lower()
    if any(fragment in message for fragment in FATAL_NPU_MESSAGES):
        return True
    return any(int(code) in FATAL_ACL_ERROR_CODES for code in _ACL_CODE.findall(message))

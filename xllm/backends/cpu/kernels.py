"""The CPU backend's fast path: fused float32 kernels in C (``csrc/fast_ops.c``).

A decode step of a small model on a CPU spends as long in its small ops as in its GEMVs: torch
runs RMSNorm, rotary, the cache write and paged attention as ten to thirty ATen calls each, a few
microseconds apiece, and its GEMM path for a handful of rows reads the weights several times over.
Measured on the 100M-parameter Llama at batch 1 (2 threads of an AVX-512 EPYC, float32), a step
took 10.2 ms, 4.3 ms of it outside the projections; attention alone was 1.6 ms (12 layers).
These kernels do each op in one call, reading the paged cache through the block table in place:

- `rms_norm` (with the fused residual add), `rotary` (in place, NeoX or GPT-J pairs),
  `silu_and_mul`, `cache_write`: elementwise, built with ``-ffp-contract=off`` so each product
  and sum rounds as the torch ops round it;
- `paged_decode`: one query token per sequence over its paged context (GQA, sliding window),
  one task per (sequence, KV head) so the query heads of a group share every key read;
- `linear`: tiles of 4 weight rows by 4 rows of x in SIMD registers (AVX-512; 2 by 4 on AVX2),
  rows of x in chunks that stay in L2. The weights stream once at memory speed for a few rows,
  and many rows run near the FMA peak. On the 49 projections of that model (450 MB), 2 threads,
  against the plain path (weights split over the threads by ``bmm`` up to 256 rows, then
  ``F.linear``, i.e. MKL, which does not take its fast paths on this AMD host), ms: 1 row 9.3 ->
  8.9, 8 rows 28.2 -> 16.5, 32 rows 55.3 -> 33.9, 64 rows 92.1 -> 57.3, 256 rows 306 -> 208,
  2048 rows 2305 -> 1722 (277 GFLOP/s).

Each returns None where it does not apply (another dtype, a layout it does not read), and the
backend runs its plain torch op. Those plain ops stay the reference: ``CpuBackend(kernels=False)``
(or ``XLLM_CPU_KERNELS=0``) runs only them, the conformance suite's ``cpu`` reference is built so,
and ``xllm conformance --backend cpu`` checks the kernels against it (``--against cpu``) or
against NumPy. The source is built once per machine by `cbuild`; without a C compiler the
backend runs its plain ops.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading
from collections.abc import Callable
from importlib import resources

import torch

from xllm.backends.cpu import cbuild

_F32 = torch.float32


@functools.cache
def _library() -> ctypes.CDLL | None:
    source = resources.files("xllm.backends.cpu").joinpath("csrc/fast_ops.c").read_text()
    lib = cbuild.load(
        "fast_ops", source, ("-ffp-contract=off",), what="the CPU backend runs its plain torch ops"
    )
    if lib is None:
        return None
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    signatures = {
        "xllm_rms_norm": [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, f32, i32],
        "xllm_rotary": [ptr, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i32],
        "xllm_silu_and_mul": [ptr, ptr, i64, i64, i32],
        "xllm_cache_write": [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64],
        "xllm_paged_decode": [
            ptr,
            i64,
            ptr,
            ptr,
            ptr,
            i64,
            ptr,
            ptr,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            f32,
            i64,
            i32,
        ],
        "xllm_linear": [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i32],
        "xllm_embedding": [ptr, ptr, ptr, i64, i64, i64],
        "xllm_replay": [ptr, i64],
    }
    # -1: an index out of range, nothing done
    checked = {"xllm_cache_write", "xllm_paged_decode", "xllm_embedding", "xllm_replay"}
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int if name in checked else None
    return lib


def available() -> bool:
    return _library() is not None


# ---- recording: the CPU backend's graphs (graphs.py) ---------------------------------------------

# Kernel numbers and the row width of a recorded program, as csrc/fast_ops.c's xllm_replay reads them.
_KERNEL_NUMBERS = {
    "xllm_rms_norm": 1,
    "xllm_rotary": 2,
    "xllm_silu_and_mul": 3,
    "xllm_cache_write": 4,
    "xllm_paged_decode": 5,
    "xllm_linear": 6,
    "xllm_embedding": 7,
    "xllm_q8_linear": 8,  # from another library: the record's first argument is its address
}
_RECORD_WIDTH = 20
_local = threading.local()


class Recorder:
    """The kernel calls made while it is active (`recording`), as a program `replay` runs again:
    the same kernels on the same buffers, whose contents may have changed. It keeps every output
    it saw allocated alive, so the addresses in the program stay valid."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.buffers: list[torch.Tensor] = []
        self.foreign: list[str] = []  # other native kernels that ran: the program would miss them

    def add(self, name: str, args: tuple[object, ...]) -> None:
        row = [_KERNEL_NUMBERS[name]]
        for arg in args:
            if arg is None:
                row.append(0)
            elif isinstance(arg, float):  # float32 arguments travel as their bits
                row.append(struct.unpack("<i", struct.pack("<f", arg))[0])
            else:
                row.append(int(arg))
        self.rows.append(row + [0] * (_RECORD_WIDTH - len(row)))

    def program(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.int64).view(-1, _RECORD_WIDTH)


class recording:  # noqa: N801 - a context manager, used as `with recording() as rec:`
    """Records the kernel calls of this thread into a new `Recorder`."""

    def __enter__(self) -> Recorder:
        self.recorder = Recorder()
        _local.recorder = self.recorder
        return self.recorder

    def __exit__(self, *exc: object) -> None:
        _local.recorder = None


def record_foreign_call(name: str, fn: ctypes._CFuncPtr, *args: object) -> None:
    """Records a call of a kernel from another library (by its address; `xllm_replay` knows its
    signature), when a recording is on."""
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.add(name, (ctypes.cast(fn, ctypes.c_void_p).value, *args))


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = x @ weight.T`` where out may be a block of columns of a wider matrix (rows
    ``out.stride(0)`` apart); False where the kernel does not apply. Not recorded."""
    lib = _linear_library(x, weight, None)
    if lib is None or not _rows_f32(out) or out.shape != (x.shape[0], weight.shape[0]):
        return False
    _linear_call(lib.xllm_linear, x, weight, None, out)
    return True


def note_foreign_kernel(name: str) -> None:
    """Called by native kernels that are not recorded (the int8 linear), so that a recording they
    ran in is not replayed without them."""
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.foreign.append(name)


def replay(program: torch.Tensor) -> bool:
    """Runs a recorded program; False if a kernel found an index out of range (stopped there)."""
    lib = _library()
    assert lib is not None, "a program is only recorded where the kernels run"
    return lib.xllm_replay(program.data_ptr(), program.shape[0]) == 0


def _run(lib: ctypes.CDLL, name: str, *args: object) -> int | None:
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.add(name, args)
    return getattr(lib, name)(*args)


def output_buffer(*shape: int) -> torch.Tensor:
    """A float32 output, kept alive by the recording when one is on."""
    out = torch.empty(*shape, dtype=_F32)
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.buffers.append(out)
    return out


def _rows_f32(x: torch.Tensor) -> bool:
    """A float32 CPU matrix whose rows are contiguous (any row stride)."""
    return x.dtype == _F32 and x.device.type == "cpu" and x.dim() == 2 and x.stride(1) == 1


def _dense_f32(x: torch.Tensor) -> bool:
    return x.dtype == _F32 and x.device.type == "cpu" and x.is_contiguous()


def _ptr(x: torch.Tensor | None) -> int | None:
    return x.data_ptr() if x is not None else None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    shape = x.shape
    if x.dtype != _F32 or x.device.type != "cpu" or x.dim() not in (2, 3) or x.stride(-1) != 1:
        return None
    h = shape[-1]
    heads = shape[1] if x.dim() == 3 else 1
    head_stride = x.stride(1) if x.dim() == 3 else 0
    if not (_dense_f32(weight) and weight.numel() == h):
        return None
    if residual is not None and (not _dense_f32(residual) or residual.shape != shape or x.dim() != 2):
        return None
    lib = _library()
    if lib is None:
        return None
    out = output_buffer(*shape)
    hidden = output_buffer(*shape) if residual is not None else None
    _run(
        lib, "xllm_rms_norm", x.data_ptr(), x.stride(0), head_stride, heads, _ptr(residual),
        weight.data_ptr(), out.data_ptr(), _ptr(hidden), shape[0], h, eps, torch.get_num_threads(),
    )  # fmt: skip
    return (out, hidden) if hidden is not None else out


def embedding(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """Rows of `weight` for `input_ids` [T]; None where the kernel does not apply or an id is out
    of range (the reference op then raises)."""
    if not (_dense_f32(weight) and weight.dim() == 2 and input_ids.dim() == 1):
        return None
    if input_ids.dtype != torch.int64 or not input_ids.is_contiguous():
        return None
    lib = _library()
    if lib is None:
        return None
    out = output_buffer(input_ids.shape[0], weight.shape[1])
    status = _run(
        lib, "xllm_embedding", input_ids.data_ptr(), weight.data_ptr(), out.data_ptr(),
        input_ids.shape[0], weight.shape[1], weight.shape[0],
    )  # fmt: skip
    return out if status == 0 else None


def _heads_ok(x: torch.Tensor) -> bool:
    return x.dtype == _F32 and x.device.type == "cpu" and x.dim() == 3 and x.stride(2) == 1


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, neox_style: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not (_heads_ok(q) and _heads_ok(k) and _dense_f32(cos_sin_cache) and cos_sin_cache.dim() == 2):
        return None
    rot = cos_sin_cache.shape[1]
    if rot % 2 or rot > q.shape[2] or rot > k.shape[2] or q.shape[0] != k.shape[0]:
        return None
    lib = _library()
    if lib is None:
        return None
    pos = positions.to(torch.int64).contiguous()
    _run(
        lib, "xllm_rotary", pos.data_ptr(), q.data_ptr(), q.stride(0), q.stride(1), q.shape[1],
        k.data_ptr(), k.stride(0), k.stride(1), k.shape[1],
        cos_sin_cache.data_ptr(), rot, q.shape[0], int(neox_style),
    )  # fmt: skip
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    if not (_dense_f32(x) and x.dim() == 2 and x.shape[1] % 2 == 0):
        return None
    lib = _library()
    if lib is None:
        return None
    t, i = x.shape[0], x.shape[1] // 2
    out = output_buffer(t, i)
    _run(lib, "xllm_silu_and_mul", x.data_ptr(), out.data_ptr(), t, i, torch.get_num_threads())
    return out


def _token_rows(x: torch.Tensor) -> bool:
    """[T, H, D] float32 whose (H, D) part of each token is contiguous."""
    return _heads_ok(x) and x.stride(1) == x.shape[2]


def cache_write(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> bool:
    """Writes k, v into the caches; False (nothing written) where the kernel does not apply or a
    slot is out of range (the reference op then raises)."""
    if not (_token_rows(k) and _token_rows(v) and _dense_f32(k_cache) and _dense_f32(v_cache)):
        return False
    width = k.shape[1] * k.shape[2]
    if v.shape != k.shape or k_cache.dim() != 4 or k_cache.shape[2] * k_cache.shape[3] != width:
        return False
    lib = _library()
    if lib is None:
        return False
    slots = slot_mapping.to(torch.int64).contiguous()
    status = _run(
        lib, "xllm_cache_write", k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        slots.data_ptr(), k.shape[0], width, k_cache.shape[0] * k_cache.shape[1],
    )  # fmt: skip
    return status == 0


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """float32 [B, Hq, D] attention of one query per row (q [B, Hq, D]); None where it does not
    apply or a block index is out of range (the reference op then raises)."""
    if not (_token_rows(q) and _dense_f32(k_cache) and _dense_f32(v_cache) and k_cache.dim() == 4):
        return None
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d or hq % hkv or v_cache.shape != k_cache.shape:
        return None
    lib = _library()
    if lib is None:
        return None
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    out = output_buffer(b, hq, d)
    status = _run(
        lib, "xllm_paged_decode", q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
        tables.shape[1], lens.data_ptr(), out.data_ptr(), b, hq, hkv, d, k_cache.shape[1],
        k_cache.shape[0], scale, sliding_window or 0, torch.get_num_threads(),
    )  # fmt: skip
    return out if status == 0 else None


def _linear_library(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> ctypes.CDLL | None:
    """The kernels' library where the linear kernel takes these operands, else None."""
    if not (_rows_f32(x) and _dense_f32(weight) and weight.dim() == 2):
        return None
    if weight.shape[1] != x.shape[1] or (bias is not None and not _dense_f32(bias)):
        return None
    return _library()


def _linear_call(
    call: Callable[..., object],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    (o, i) = weight.shape
    call(
        x.data_ptr(), x.stride(0), weight.data_ptr(), _ptr(bias), out.data_ptr(), out.stride(0), x.shape[0], o, i,
        torch.get_num_threads(),
    )  # fmt: skip


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    lib = _linear_library(x, weight, bias)
    if lib is None:
        return None
    out = output_buffer(x.shape[0], weight.shape[0])
    _linear_call(functools.partial(_run, lib, "xllm_linear"), x, weight, bias, out)
    return out

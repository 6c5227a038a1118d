"""Weight-only int8 linear (Q8_0 layout) for the CPU backend: a small C kernel, built on first use.

A decode step is bound by the bytes of weights it streams, and int8 weights are a quarter of
float32's; but torch has no CPU kernel that multiplies by a per-group-scaled int8 matrix
(``aten._weight_int8pack_mm`` takes one scale per output row, and measured 30-55x slower than
the float32 path at 64 rows and slower even at one), and dequantising in torch first writes and
re-reads four bytes per weight, which costs more than the float32 GEMV it replaces. So, as
llama.cpp does, a kernel reads the int8 rows directly: each output row's groups are widened to
float and multiplied with the activations in SIMD registers (AVX-512 or AVX2/FMA where the
compiler targets them, plain C that the compiler vectorises elsewhere), rows split over the
OpenMP threads torch itself uses (the kernel links the libgomp torch has loaded, so there is one
pool). Four activation rows share each widened weight vector, which keeps small batches near the
one-row cost.

From `_DIRECT_MAX_ROWS` rows on the arithmetic dominates, and a GEMM beats this kernel's dot
products: blocks of weight rows are then dequantised by the kernel into a reused buffer that
stays in cache and multiplied there by the float32 GEMM of `kernels` (``torch.mm`` where that
is not built), so the float32 matrix never exists whole (measured level with float32 from 32 to
256 rows).

The C source is compiled once per machine by `cbuild` (under a second); where there is no
compiler or the build fails, `linear_int8` returns None and the backend falls back to the HAL's
dequantising reference (so does ``XLLM_CPU_INT8_KERNEL=0``). The kernel accumulates in float32
like the reference, in another order; the conformance suite's ``linear_int8`` cases compare the
two. The direct kernel's calls are recorded into the CPU backend's graphs (`kernels.Recorder`);
the GEMM path is not, so a step that takes it replays eagerly.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import torch

from xllm.backends.cpu import cbuild, kernels

# Rows of x up to which the direct kernel runs. Measured on the 48 projections of a decode step
# of the 100M-parameter Llama (12 layers, weights cold in cache: 340 MB float32, 96 MB int8), 2
# threads of an AVX-512 EPYC, float32 -> int8 direct / int8 GEMM path, ms: 1 row 5.8 -> 2.3 /
# 38, 4 rows 11.8 -> 4.4 / 16.9, 16 rows 27.2 -> 16.7 / 28.3, 24 rows 39.1 -> 28.5 / 39.7, 32
# rows 41.2 -> 36.4 / 42.9, 64 rows 71.1 -> 165 / 73.0; on one thread the two int8 paths cross
# between 16 and 32 rows (noisy), so 24 keeps the direct kernel where it clearly wins.
_DIRECT_MAX_ROWS = 24
# float32 bytes of weight rows dequantised per block on the GEMM path (about 1300 rows of 768).
# At 32-64 rows, 2 threads: 4 MiB blocks ran level with float32, 1 MiB blocks 10% and whole
# matrices 25% slower (every block is two OpenMP regions, and on a busy machine each region risks
# a stall); whole matrices won at 256 rows on one thread but need a scratch buffer as large as the
# largest weight.
_BLOCK_BYTES = 4 << 20
# Multiply-adds below which one thread runs the kernel (torch's own grain size is 32768 elements).
_PARALLEL_MIN_WORK = 1 << 17
# The kernels read groups 16 int8 at a time.
_LANE_MULTIPLE = 16

_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* NT rows of x against one int8 weight row; the int8 -> float widening is shared by the rows.
   Groups go in pairs with a running total each: the total is the one chain that runs through the
   whole row, and a single one capped the row at one group per FMA latency. */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSET1(v) _mm512_set1_ps(v)
#define VSUM(v) _mm512_reduce_add_ps(v)
#define VADD(a, b) _mm512_add_ps(a, b)
#define GROUP(acc, qg, xrow, NT, ldx)                                                          \
  for (int64_t k = 0; k < gs; k += 16) {                                                       \
    vec w_ = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qg + k)))); \
    for (int t = 0; t < NT; t++) acc[t] = VFMA(w_, _mm512_loadu_ps(xrow + t * ldx + k), acc[t]); \
  }
#else
#include <immintrin.h>
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VSET1(v) _mm256_set1_ps(v)
#define VADD(a, b) _mm256_add_ps(a, b)
static inline float VSUM(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#define GROUP(acc, qg, xrow, NT, ldx)                                                          \
  for (int64_t k = 0; k < gs; k += 16) {                                                       \
    __m128i b_ = _mm_loadu_si128((const __m128i*)(qg + k));                                    \
    vec w0_ = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b_));                                    \
    vec w1_ = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b_, 8)));                 \
    for (int t = 0; t < NT; t++) {                                                             \
      acc[t] = VFMA(w0_, _mm256_loadu_ps(xrow + t * ldx + k), acc[t]);                         \
      acc[t] = VFMA(w1_, _mm256_loadu_ps(xrow + t * ldx + k + 8), acc[t]);                     \
    }                                                                                          \
  }
#endif
#define DEFINE_ROWS(NT)                                                                        \
static inline void rows_##NT(const int8_t* qr, const float* sr, const float* x, int64_t ldx,  \
                             int64_t G, int64_t gs, float* out) {                               \
  vec t0[NT], t1[NT];                                                                          \
  for (int t = 0; t < NT; t++) t0[t] = t1[t] = VZERO();                                        \
  int64_t g = 0;                                                                               \
  for (; g + 2 <= G; g += 2) {                                                                 \
    vec a0[NT], a1[NT];                                                                        \
    for (int t = 0; t < NT; t++) a0[t] = a1[t] = VZERO();                                      \
    GROUP(a0, (qr + g * gs), (x + g * gs), NT, ldx)                                            \
    GROUP(a1, (qr + (g + 1) * gs), (x + (g + 1) * gs), NT, ldx)                                \
    vec s0 = VSET1(sr[g]), s1 = VSET1(sr[g + 1]);                                              \
    for (int t = 0; t < NT; t++) {                                                             \
      t0[t] = VFMA(a0[t], s0, t0[t]);                                                          \
      t1[t] = VFMA(a1[t], s1, t1[t]);                                                          \
    }                                                                                          \
  }                                                                                            \
  if (g < G) {                                                                                 \
    vec a0[NT];                                                                                \
    for (int t = 0; t < NT; t++) a0[t] = VZERO();                                              \
    GROUP(a0, (qr + g * gs), (x + g * gs), NT, ldx)                                            \
    vec s0 = VSET1(sr[g]);                                                                     \
    for (int t = 0; t < NT; t++) t0[t] = VFMA(a0[t], s0, t0[t]);                               \
  }                                                                                            \
  for (int t = 0; t < NT; t++) out[t] = VSUM(VADD(t0[t], t1[t]));                              \
}
#else
#define DEFINE_ROWS(NT)                                                                        \
static inline void rows_##NT(const int8_t* qr, const float* sr, const float* x, int64_t ldx,  \
                             int64_t G, int64_t gs, float* out) {                               \
  for (int t = 0; t < NT; t++) {                                                               \
    float total[16] = {0};                                                                     \
    const float* xr = x + t * ldx;                                                             \
    for (int64_t g = 0; g < G; g++) {                                                          \
      float acc[16] = {0};                                                                     \
      const int8_t* qg = qr + g * gs;                                                          \
      const float* xg = xr + g * gs;                                                           \
      for (int64_t k = 0; k < gs; k += 16)                                                     \
        for (int j = 0; j < 16; j++) acc[j] += (float)qg[k + j] * xg[k + j];                   \
      for (int j = 0; j < 16; j++) total[j] += acc[j] * sr[g];                                 \
    }                                                                                          \
    float sum = 0.f;                                                                           \
    for (int j = 0; j < 16; j++) sum += total[j];                                              \
    out[t] = sum;                                                                              \
  }                                                                                            \
}
#endif
DEFINE_ROWS(1)
DEFINE_ROWS(4)

/* y[T, O] = x[T, I] @ (q[O, I] * s[O, I / gs]).T + bias[O]; gs % 16 == 0. */
void xllm_q8_linear(const float* x, const int8_t* q, const float* s, const float* bias, float* y,
                    int64_t T, int64_t O, int64_t I, int64_t gs, int nthreads) {
  const int64_t G = I / gs;
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t o = 0; o < O; o++) {
    const int8_t* qr = q + o * I;
    const float* sr = s + o * G;
    const float b = bias ? bias[o] : 0.f;
    float out[4];
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
      rows_4(qr, sr, x + t * I, I, G, gs, out);
      for (int j = 0; j < 4; j++) y[(t + j) * O + o] = out[j] + b;
    }
    for (; t < T; t++) {
      rows_1(qr, sr, x + t * I, I, G, gs, out);
      y[t * O + o] = out[0] + b;
    }
  }
}

/* w[R, I] = q[R, I] * s[R, I / gs] in float32, the reference's dequantisation exactly. */
void xllm_q8_dequant(const int8_t* q, const float* s, float* w, int64_t R, int64_t I, int64_t gs,
                     int nthreads) {
  const int64_t G = I / gs;
  #pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < R; r++)
    for (int64_t g = 0; g < G; g++) {
      const float sc = s[r * G + g];
      const int8_t* qg = q + r * I + g * gs;
      float* wg = w + r * I + g * gs;
      for (int64_t k = 0; k < gs; k++) wg[k] = (float)qg[k] * sc;
    }
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None (logged once) if it cannot be built."""
    if os.environ.get("XLLM_CPU_INT8_KERNEL", "1") == "0":
        return None
    lib = cbuild.load("q8_linear", _SOURCE, what="int8 linear layers use the slower dequantising path")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.xllm_q8_linear.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.xllm_q8_linear.restype = None
    lib.xllm_q8_dequant.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.xllm_q8_dequant.restype = None
    return lib


def available() -> bool:
    return _library() is not None


_buffers = threading.local()


def _block_buffer(numel: int) -> torch.Tensor:
    """A float32 scratch buffer reused across calls (one per thread), at least `numel` long."""
    buf = getattr(_buffers, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        _buffers.buf = buf
    return buf[:numel]


def linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor | None:
    """``x @ (qweight * scales).T + bias`` through the kernel, or None where it does not apply
    (no kernel, a dtype other than float32, a group size the kernel does not read)."""
    if (
        x.dtype != torch.float32
        or group_size % _LANE_MULTIPLE
        or (bias is not None and bias.dtype != torch.float32)
    ):
        return None
    lib = _library()
    if lib is None:
        return None
    x = x.contiguous()
    qweight = qweight.contiguous()
    scales = scales.contiguous()
    rows, in_features = x.shape
    out_features = qweight.shape[0]
    # Small products finish before a second thread would have started (and on a busy machine a
    # thread that is not scheduled at once stalls the whole call).
    threads = torch.get_num_threads() if qweight.numel() * rows >= _PARALLEL_MIN_WORK else 1
    if rows <= _DIRECT_MAX_ROWS:
        out = kernels.output_buffer(rows, out_features)
        if bias is not None:
            bias = bias.contiguous()
        args = (
            x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), bias.data_ptr() if bias is not None else None,
            out.data_ptr(), rows, out_features, in_features, group_size, threads,
        )  # fmt: skip
        kernels.record_foreign_call("xllm_q8_linear", lib.xllm_q8_linear, *args)  # part of a CPU graph
        lib.xllm_q8_linear(*args)
        return out
    kernels.note_foreign_kernel("int8 linear, GEMM path")
    # GEMM path: each block of weight rows, dequantised into a buffer that stays in cache, fills a
    # block of the output's columns (the float32 kernel's product where it is built, else MKL's).
    out = torch.empty(rows, out_features, dtype=torch.float32)
    block = max(1, min(out_features, _BLOCK_BYTES // (4 * in_features)))
    buf = _block_buffer(block * in_features).view(block, in_features)
    for start in range(0, out_features, block):
        n = min(block, out_features - start)
        w = buf[:n]
        lib.xllm_q8_dequant(
            qweight[start].data_ptr(),
            scales[start].data_ptr(),
            w.data_ptr(),
            n,
            in_features,
            group_size,
            threads,
        )
        columns = out[:, start : start + n]
        if not kernels.linear_into(x, w, columns):
            torch.mm(x, w.t(), out=columns)
    return out + bias if bias is not None else out

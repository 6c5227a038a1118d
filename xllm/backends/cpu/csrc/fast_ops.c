/* Fused float32 kernels of the CPU backend's fast path (see kernels.py for why and when).

   Built with -ffp-contract=off: the elementwise kernels (RMSNorm's scaling, rotary, SiLU * up)
   then round every product and sum exactly as the torch reference ops do, one operation at a
   time; the GEMV and the attention dot products use FMA intrinsics or reductions in their own
   order, which the conformance tolerances cover. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

/* Work below this many multiply-adds runs on the calling thread: waking the pool costs more. */
#define PARALLEL_MIN_WORK 32768

static inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
  return acc;
}

#if defined(__AVX512F__)
/* exp of 16 floats: Cephes' expf (range reduction by ln 2 in two parts, a degree-5 polynomial,
   2^n by scalef), within 2 ulp of the true value over the range softmax and SiLU use; below
   -87.3 it returns ~1e-38 instead of a denormal. */
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

/* s[0..n) <- softmax(s[0..n)) */
static inline void softmax_inplace(float* s, int64_t n) {
  float m = s[0];
  for (int64_t i = 1; i < n; i++) m = s[i] > m ? s[i] : m;
  float sum = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), mv));
    _mm512_storeu_ps(s + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; i++) {
    s[i] = expf(s[i] - m);
    sum += s[i];
  }
  const float inv = 1.f / sum;
  for (i = 0; i < n; i++) s[i] *= inv;
}

/* out = weight * (h * rsqrt(mean(h^2) + eps)) over rows of H, with h = x (+ residual, also
   written to hidden). Rows are (token, head) pairs, `ldt` and `ldh` apart (heads: per-head
   norms of strided q/k views; NH = 1 otherwise); out and hidden are dense [T * NH, H]. */
void xllm_rms_norm(const float* x, int64_t ldt, int64_t ldh, int64_t NH, const float* residual,
                   const float* weight, float* out, float* hidden, int64_t T, int64_t H, float eps,
                   int nthreads) {
  const int64_t R = T * NH;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (R * H >= PARALLEL_MIN_WORK)
  for (int64_t r = 0; r < R; r++) {
    const float* h = x + (r / NH) * ldt + (r % NH) * ldh;
    if (residual != NULL) {
      float* hr = hidden + r * H;
      const float* res = residual + r * H;
      for (int64_t i = 0; i < H; i++) hr[i] = h[i] + res[i];
      h = hr;
    }
    float ss = dot(h, h, H);
    float inv = 1.f / sqrtf(ss / (float)H + eps);
    float* o = out + r * H;
    for (int64_t i = 0; i < H; i++) o[i] = weight[i] * (h[i] * inv);
  }
}

/* out[t] = table[ids[t]] (rows of H); -1, having written nothing, when an id is outside [0, V). */
int xllm_embedding(const int64_t* ids, const float* table, float* out, int64_t T, int64_t H, int64_t V) {
  for (int64_t t = 0; t < T; t++)
    if (ids[t] < 0 || ids[t] >= V) return -1;
  for (int64_t t = 0; t < T; t++) memcpy(out + t * H, table + ids[t] * H, (size_t)H * sizeof(float));
  return 0;
}

static inline void rotate_head(float* x, const float* c, const float* s, int64_t half, int neox) {
  if (neox) {
    for (int64_t i = 0; i < half; i++) {
      float x1 = x[i], x2 = x[i + half];
      x[i] = x1 * c[i] - x2 * s[i];
      x[i + half] = x2 * c[i] + x1 * s[i];
    }
  } else {
    for (int64_t i = 0; i < half; i++) {
      float x1 = x[2 * i], x2 = x[2 * i + 1];
      x[2 * i] = x1 * c[i] - x2 * s[i];
      x[2 * i + 1] = x2 * c[i] + x1 * s[i];
    }
  }
}

/* In place on the first `rot` dims of every head of q [T, Hq, *] and k [T, Hk, *] (token and
   head strides given); cos_sin rows hold rot/2 cosines then rot/2 sines. */
void xllm_rotary(const int64_t* positions, float* q, int64_t q_ts, int64_t q_hs, int64_t Hq, float* k,
                 int64_t k_ts, int64_t k_hs, int64_t Hk, const float* cos_sin, int64_t rot, int64_t T,
                 int neox) {
  const int64_t half = rot / 2;
  for (int64_t t = 0; t < T; t++) {
    const float* c = cos_sin + positions[t] * rot;
    const float* s = c + half;
    for (int64_t h = 0; h < Hq; h++) rotate_head(q + t * q_ts + h * q_hs, c, s, half, neox);
    for (int64_t h = 0; h < Hk; h++) rotate_head(k + t * k_ts + h * k_hs, c, s, half, neox);
  }
}

/* out[t] = silu(x[t, :I]) * x[t, I:], silu(g) = g / (1 + exp(-g)) as torch computes it (with a
   vector exp on AVX-512, as torch's own vectorised kernel has). */
void xllm_silu_and_mul(const float* x, float* out, int64_t T, int64_t I, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * I >= PARALLEL_MIN_WORK)
  for (int64_t t = 0; t < T; t++) {
    const float* g = x + t * 2 * I;
    const float* u = g + I;
    float* o = out + t * I;
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= I; i += 16) {
      const __m512 gv = _mm512_loadu_ps(g + i);
      const __m512 den = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
      _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_div_ps(gv, den), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < I; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
  }
}

/* Token t's `width` K and V values go to slot slots[t] of contiguous caches of `num_slots`
   slots; a negative slot writes nothing (graph padding rows). Returns -1, having written
   nothing, when a slot is past the cache (the caller's reference op then raises). */
int xllm_cache_write(const float* k, int64_t k_ts, const float* v, int64_t v_ts, float* k_cache,
                     float* v_cache, const int64_t* slots, int64_t T, int64_t width, int64_t num_slots) {
  for (int64_t t = 0; t < T; t++)
    if (slots[t] >= num_slots) return -1;
  for (int64_t t = 0; t < T; t++) {
    int64_t s = slots[t];
    if (s < 0) continue;
    memcpy(k_cache + s * width, k + t * k_ts, (size_t)width * sizeof(float));
    memcpy(v_cache + s * width, v + t * v_ts, (size_t)width * sizeof(float));
  }
  return 0;
}

/* q . k over a head of D, and o += p * v: explicit FMAs where D is whole vectors. */
static inline float dot_d(const float* a, const float* b, int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), _mm512_loadu_ps(b + d + 16), acc1);
    }
    if (d < D) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
#endif
  return dot(a, b, D);
}

static inline void axpy_d(float* o, float p, const float* v, int64_t D) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    const __m512 pv = _mm512_set1_ps(p);
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(o + d, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + d), _mm512_loadu_ps(o + d)));
    return;
  }
#endif
#pragma omp simd
  for (int64_t d = 0; d < D; d++) o[d] += p * v[d];
}

#if defined(__AVX512F__)
/* The 4 sums of 4 vectors, in one 128-bit vector: one shuffle tree instead of 4 reductions. */
static inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 a01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 a23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 lo = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a01), _mm512_castps_pd(a23)));
  const __m512 hi = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a01), _mm512_castps_pd(a23)));
  const __m512 s = _mm512_add_ps(lo, hi); /* each 128-bit lane: partial sums of a0..a3 */
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* scores[j * n + i] = scale * q_j . k_(start + i) for the G query heads of one KV head (D a
   multiple of 16, at most 128): each head's query stays in registers, keys go 4 at a time. */
static void head_scores16(const float* qb, const float* kh, const int32_t* bt, int64_t BS, int64_t row,
                          int64_t start, int64_t n, int64_t G, int64_t D, float scale, float* scores) {
  const int64_t DV = D / 16;
  const __m128 sc = _mm_set1_ps(scale);
  for (int64_t j = 0; j < G; j++) {
    __m512 qv[8];
    for (int64_t d = 0; d < DV; d++) qv[d] = _mm512_loadu_ps(qb + j * D + 16 * d);
    float* s = scores + j * n;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const float* kp[4];
      for (int u = 0; u < 4; u++) {
        const int64_t t = start + i + u;
        kp[u] = kh + ((int64_t)bt[t / BS] * BS + t % BS) * row;
      }
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < DV; d++) {
        a0 = _mm512_fmadd_ps(qv[d], _mm512_loadu_ps(kp[0] + 16 * d), a0);
        a1 = _mm512_fmadd_ps(qv[d], _mm512_loadu_ps(kp[1] + 16 * d), a1);
        a2 = _mm512_fmadd_ps(qv[d], _mm512_loadu_ps(kp[2] + 16 * d), a2);
        a3 = _mm512_fmadd_ps(qv[d], _mm512_loadu_ps(kp[3] + 16 * d), a3);
      }
      _mm_storeu_ps(s + i, _mm_mul_ps(reduce4(a0, a1, a2, a3), sc));
    }
    for (; i < n; i++) {
      const int64_t t = start + i;
      const float* k1 = kh + ((int64_t)bt[t / BS] * BS + t % BS) * row;
      __m512 a = _mm512_setzero_ps();
      for (int64_t d = 0; d < DV; d++) a = _mm512_fmadd_ps(qv[d], _mm512_loadu_ps(k1 + 16 * d), a);
      s[i] = _mm512_reduce_add_ps(a) * scale;
    }
  }
}

/* o_j = sum_i p[j * n + i] v_(start + i), each head's output in registers over the context. */
static void head_values16(const float* vh, const int32_t* bt, int64_t BS, int64_t row, int64_t start,
                          int64_t n, int64_t G, int64_t D, const float* p, float* o) {
  const int64_t DV = D / 16;
  for (int64_t j = 0; j < G; j++) {
    __m512 acc[8];
    for (int64_t d = 0; d < DV; d++) acc[d] = _mm512_setzero_ps();
    const float* pj = p + j * n;
    for (int64_t i = 0; i < n; i++) {
      const int64_t t = start + i;
      const float* vp = vh + ((int64_t)bt[t / BS] * BS + t % BS) * row;
      const __m512 pv = _mm512_set1_ps(pj[i]);
      for (int64_t d = 0; d < DV; d++) acc[d] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(vp + 16 * d), acc[d]);
    }
    for (int64_t d = 0; d < DV; d++) _mm512_storeu_ps(o + j * D + 16 * d, acc[d]);
  }
}
#endif

/* One query token per sequence b against its paged context: keys [start, seq_lens[b]) with
   start = seq_len - window under a sliding window. Caches [blocks, BS, Hkv, D] contiguous; q rows
   [Hq, D] `q_ts` apart; out [B, Hq, D]. Query head h reads KV head h / (Hq / Hkv). Each task is
   one (sequence, KV head): its query heads share every key and value row read. Returns -1,
   having computed nothing, when a sequence's blocks are past its table row or the cache's
   `num_blocks` (the caller's reference op then raises). */
int xllm_paged_decode(const float* q, int64_t q_ts, const float* k_cache, const float* v_cache,
                      const int32_t* tables, int64_t W, const int32_t* seq_lens, float* out, int64_t B,
                      int64_t Hq, int64_t Hkv, int64_t D, int64_t BS, int64_t num_blocks, float scale,
                      int64_t window, int nthreads) {
  const int64_t G = Hq / Hkv;
  int64_t total = 0;
  for (int64_t b = 0; b < B; b++) {
    const int64_t used = (seq_lens[b] + BS - 1) / BS;
    if (used > W) return -1;
    const int64_t first = (window > 0 && seq_lens[b] > window) ? (seq_lens[b] - window) / BS : 0;
    for (int64_t i = first; i < used; i++)
      if (tables[b * W + i] < 0 || tables[b * W + i] >= num_blocks) return -1;
    total += seq_lens[b];
  }
#pragma omp parallel num_threads(nthreads) if (total * Hq * D >= PARALLEL_MIN_WORK)
  {
    float* scores = NULL;
    int64_t cap = 0;
    /* With sequences enough to keep every thread busy, a task is a whole sequence, its KV heads
       in turn: the heads' slices of each cache row are then read close together in time by one
       core (64 sequences, KV in DRAM: 0.62-0.68 -> 0.55 ms a layer). With few, a task is one
       (sequence, KV head), so that one long sequence still uses every thread. */
    const int per_seq = B >= 4 * (int64_t)nthreads;
    const int64_t tasks = per_seq ? B : B * Hkv;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++)
    for (int64_t h = per_seq ? 0 : task % Hkv; h < (per_seq ? Hkv : task % Hkv + 1); h++) {
      const int64_t b = per_seq ? task : task / Hkv;
      const int64_t len = seq_lens[b];
      const int64_t start = (window > 0 && len > window) ? len - window : 0;
      const int64_t n = len - start;
      float* o = out + (b * Hq + h * G) * D;
      memset(o, 0, (size_t)(G * D) * sizeof(float));
      if (n <= 0) continue;
      if (n * G > cap) {
        free(scores);
        cap = n * G;
        scores = (float*)malloc((size_t)cap * sizeof(float));
      }
      const int32_t* bt = tables + b * W;
      const float* qb = q + b * q_ts + h * G * D;
      const int64_t row = Hkv * D;  /* floats between a block's consecutive tokens */
      const float* kh = k_cache + h * D;
      const float* vh = v_cache + h * D;
#if defined(__AVX512F__)
      if (D % 16 == 0 && D <= 128) {
        head_scores16(qb, kh, bt, BS, row, start, n, G, D, scale, scores);
        for (int64_t j = 0; j < G; j++) softmax_inplace(scores + j * n, n);
        head_values16(vh, bt, BS, row, start, n, G, D, scores, o);
        continue;
      }
#endif
      for (int64_t i = 0; i < n; i++) {
        const int64_t t = start + i;
        const float* kp = kh + ((int64_t)bt[t / BS] * BS + t % BS) * row;
        for (int64_t j = 0; j < G; j++) scores[j * n + i] = dot_d(qb + j * D, kp, D) * scale;
      }
      for (int64_t j = 0; j < G; j++) softmax_inplace(scores + j * n, n);
      for (int64_t i = 0; i < n; i++) {
        const int64_t t = start + i;
        const float* vp = vh + ((int64_t)bt[t / BS] * BS + t % BS) * row;
        for (int64_t j = 0; j < G; j++) axpy_d(o + j * D, scores[j * n + i], vp, D);
      }
    }
    free(scores);
  }
  return 0;
}

/* ---- y[T, O] = x[T, I] @ w[O, I].T + bias: few rows of x against weights streamed once. -----
   Output rows go in tiles of NW weight rows by NT rows of x (6, 4 or 1): each weight vector loaded feeds NT
   FMAs and each x vector NW, so the weights stream at memory speed while x stays in L1. */
#if defined(__AVX512F__)
typedef __m512 vec;
#define VW 16
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(v) _mm512_reduce_add_ps(v)
#define NW_MAX 4
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define VW 8
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float VSUM(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#define NW_MAX 2
#endif

#ifdef VW
/* tile_NW_NT_pf also prefetches `next` (the following weight block, NW rows) into L2 as it goes:
   a block's first tile of x rows then streams the next block in, whose first loads would
   otherwise wait on memory (over the 48 projections of a 100M model: 8 rows 10.8 -> 9.4 ms,
   16 rows 17.3 -> 14.6 ms, 64 rows 43.2 -> 41.1 ms). tile_NW_NT is it without. */
#define DEFINE_TILE(NW, NT)                                                                      \
  static inline void tile_##NW##_##NT##_pf(const float* w, const float* x, int64_t ldx, int64_t I, \
                                           float* y, int64_t ldy, const float* next) {           \
    vec acc[NW][NT];                                                                             \
    for (int a = 0; a < NW; a++)                                                                 \
      for (int t = 0; t < NT; t++) acc[a][t] = VZERO();                                          \
    int64_t k = 0;                                                                               \
    for (; k + VW <= I; k += VW) {                                                               \
      if (next != NULL)                                                                          \
        for (int a = 0; a < NW; a++) _mm_prefetch((const char*)(next + a * I + k), _MM_HINT_T1); \
      vec xv[NT];                                                                                \
      for (int t = 0; t < NT; t++) xv[t] = VLOAD(x + t * ldx + k);                               \
      for (int a = 0; a < NW; a++) {                                                             \
        vec wv = VLOAD(w + a * I + k);                                                           \
        for (int t = 0; t < NT; t++) acc[a][t] = VFMA(wv, xv[t], acc[a][t]);                     \
      }                                                                                          \
    }                                                                                            \
    for (int a = 0; a < NW; a++)                                                                 \
      for (int t = 0; t < NT; t++) {                                                             \
        float s = VSUM(acc[a][t]);                                                               \
        for (int64_t r = k; r < I; r++) s += w[a * I + r] * x[t * ldx + r];                      \
        y[t * ldy + a] = s;                                                                      \
      }                                                                                          \
  }                                                                                              \
  static inline void tile_##NW##_##NT(const float* w, const float* x, int64_t ldx, int64_t I,    \
                                      float* y, int64_t ldy) {                                   \
    tile_##NW##_##NT##_pf(w, x, ldx, I, y, ldy, NULL);                                           \
  }
#else
#define NW_MAX 1
#define DEFINE_TILE(NW, NT)                                                                      \
  static inline void tile_##NW##_##NT(const float* w, const float* x, int64_t ldx, int64_t I,    \
                                      float* y, int64_t ldy) {                                   \
    for (int a = 0; a < NW; a++)                                                                 \
      for (int t = 0; t < NT; t++) y[t * ldy + a] = dot(w + a * I, x + t * ldx, I);              \
  }
#endif
DEFINE_TILE(1, 1)
DEFINE_TILE(1, 4)
#if NW_MAX >= 2
DEFINE_TILE(2, 1)
DEFINE_TILE(2, 4)
#endif
#if NW_MAX >= 4
DEFINE_TILE(4, 1)
DEFINE_TILE(4, 4)
/* One row of x (batch-1 decode): 8 weight rows at a time keep more memory streams in flight;
   measured 15-20% faster than 4 over a 100M-parameter model's projections. */
DEFINE_TILE(8, 1)
#endif
/* A few rows of x (2-5: a small decode batch, a step verifying a few guesses): all of them in
   one tile with as many weight rows as the 32 registers hold, so each weight row streams past
   once. Measured over a 100M model's 48 projections against the 4 x 6 / 4 x 1 tiling: 2, 3 and 5
   rows 23-28% faster (7.1 -> 5.1 ms at 2), 4 rows about equal; from 6 rows on nothing gained. */
#if NW_MAX >= 4
DEFINE_TILE(8, 2)
DEFINE_TILE(8, 3)
DEFINE_TILE(6, 4)
DEFINE_TILE(5, 5)
DEFINE_TILE(1, 2)
DEFINE_TILE(1, 3)
DEFINE_TILE(1, 5)
#define SMALL_T_MAX 5
#endif
/* Many rows of x: 6 per tile (4 x 6 = 24 accumulators on AVX-512, 2 x 6 on AVX2) loads fewer
   vectors per FMA; measured 7% (64 rows) to 12% (512 rows) faster than 4 per tile. */
#if NW_MAX == 4
DEFINE_TILE(4, 6)
#define TILE_WIDE tile_4_6
#define TILE_WIDE_PF tile_4_6_pf
#elif NW_MAX == 2
DEFINE_TILE(2, 6)
#define TILE_WIDE tile_2_6
#define TILE_WIDE_PF tile_2_6_pf
#endif

/* `next`: the weight block after this one, prefetched during the first tile (or NULL). */
static inline void rows_tile(const float* w, const float* x, int64_t ldx, int64_t T, int64_t I, float* y,
                             int64_t ldy, int nw, const float* next) {
  int64_t t = 0;
#ifdef TILE_WIDE
  if (nw == NW_MAX && T >= 6) {
    TILE_WIDE_PF(w, x, ldx, I, y, ldy, next);
    t = 6;
  }
  if (nw == NW_MAX)
    for (; t + 6 <= T; t += 6) TILE_WIDE(w, x + t * ldx, ldx, I, y + t * ldy, ldy);
#else
  (void)next;
#endif
  for (; t + 4 <= T; t += 4) {
    const float* xt = x + t * ldx;
    float* yt = y + t * ldy;
#if NW_MAX >= 4
    if (nw == 4) { tile_4_4(w, xt, ldx, I, yt, ldy); continue; }
#endif
#if NW_MAX >= 2
    if (nw == 2) { tile_2_4(w, xt, ldx, I, yt, ldy); continue; }
#endif
    tile_1_4(w, xt, ldx, I, yt, ldy);
  }
  for (; t < T; t++) {
    const float* xt = x + t * ldx;
    float* yt = y + t * ldy;
#if NW_MAX >= 4
    if (nw == 4) { tile_4_1(w, xt, ldx, I, yt, ldy); continue; }
#endif
#if NW_MAX >= 2
    if (nw == 2) { tile_2_1(w, xt, ldx, I, yt, ldy); continue; }
#endif
    tile_1_1(w, xt, ldx, I, yt, ldy);
  }
}

/* y rows are `ldy` apart (O for a whole output; wider for a block of output columns). */
void xllm_linear(const float* x, int64_t ldx, const float* w, const float* bias, float* y, int64_t ldy,
                 int64_t T, int64_t O, int64_t I, int nthreads) {
  const int64_t rows = T;
  const int64_t blocks = O / NW_MAX;
  /* Rows of x go in chunks that stay in L2 while every weight row passes by (the weights are
     then read once per chunk, which at these sizes costs far less than the arithmetic). */
  int64_t chunk = (int64_t)(256 * 1024) / (I * (int64_t)sizeof(float));
  chunk = chunk < 4 ? 4 : chunk & ~(int64_t)3;
#if NW_MAX >= 4
  if (T == 1) {
    const int64_t wide = O / 8;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (O * I >= PARALLEL_MIN_WORK)
    for (int64_t blk = 0; blk <= wide; blk++) {
      if (blk < wide) {
        tile_8_1(w + blk * 8 * I, x, ldx, I, y + blk * 8, ldy);
      } else {
        for (int64_t o = wide * 8; o < O; o++) tile_1_1(w + o * I, x, ldx, I, y + o, ldy);
      }
    }
    T = 0; /* done: only the bias is left */
  }
#endif
#ifdef SMALL_T_MAX
  if (T >= 2 && T <= SMALL_T_MAX) {
    const int64_t nw = T <= 3 ? 8 : T == 4 ? 6 : 5;
    const int64_t wide = O / nw;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * O * I >= PARALLEL_MIN_WORK)
    for (int64_t blk = 0; blk <= wide; blk++) {
      const int64_t o0 = blk * nw, o1 = blk < wide ? o0 + nw : O;
      if (blk < wide) {
        const float* wb = w + o0 * I;
        if (T == 2) tile_8_2(wb, x, ldx, I, y + o0, ldy);
        else if (T == 3) tile_8_3(wb, x, ldx, I, y + o0, ldy);
        else if (T == 4) tile_6_4(wb, x, ldx, I, y + o0, ldy);
        else tile_5_5(wb, x, ldx, I, y + o0, ldy);
        continue;
      }
      for (int64_t o = o0; o < o1; o++) {
        const float* wr = w + o * I;
        if (T == 2) tile_1_2(wr, x, ldx, I, y + o, ldy);
        else if (T == 3) tile_1_3(wr, x, ldx, I, y + o, ldy);
        else if (T == 4) tile_1_4(wr, x, ldx, I, y + o, ldy);
        else tile_1_5(wr, x, ldx, I, y + o, ldy);
      }
    }
    T = 0;
  }
#endif
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t tn = T - t0 < chunk ? T - t0 : chunk;
    const float* xc = x + t0 * ldx;
    float* yc = y + t0 * ldy;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (tn * O * I >= PARALLEL_MIN_WORK)
    for (int64_t blk = 0; blk <= blocks; blk++) {
      const int64_t o = blk * NW_MAX;
      const int64_t nw = blk < blocks ? NW_MAX : O - o;
      if (nw == NW_MAX) {
        rows_tile(w + o * I, xc, ldx, tn, I, yc + o, ldy, NW_MAX, blk + 1 < blocks ? w + (o + NW_MAX) * I : NULL);
      } else {
        for (int64_t a = 0; a < nw; a++) rows_tile(w + (o + a) * I, xc, ldx, tn, I, yc + o + a, ldy, 1, NULL);
      }
    }
  }
  if (bias != NULL)
    for (int64_t t = 0; t < rows; t++)
      for (int64_t o = 0; o < O; o++) y[t * ldy + o] += bias[o];
}

/* ---- A recorded decode step (kernels.Recorder): rows of REC_WIDTH int64, the kernel's number
   then its arguments as the Python wrapper passed them (pointers as addresses, float32 values as
   their bits). Replaying runs them in order with no Python in between: the CPU's graph. Returns
   -1 as soon as a checked kernel finds an index out of range (the caller then runs the step
   eagerly, whose reference ops raise). */
#define REC_WIDTH 20
enum { K_RMS_NORM = 1, K_ROTARY, K_SILU_AND_MUL, K_CACHE_WRITE, K_PAGED_DECODE, K_LINEAR, K_EMBEDDING, K_Q8_LINEAR };

/* The int8 linear lives in its own library (quant_linear.py): its record carries its address. */
typedef void (*q8_linear_fn)(const float*, const int8_t*, const float*, const float*, float*, int64_t,
                             int64_t, int64_t, int64_t, int);

static inline float f32_of(int64_t bits) {
  union {
    int32_t i;
    float f;
  } u;
  u.i = (int32_t)bits;
  return u.f;
}
#define P(i) ((void*)(intptr_t)a[i])

int xllm_replay(const int64_t* program, int64_t n) {
  for (int64_t r = 0; r < n; r++) {
    const int64_t* a = program + r * REC_WIDTH;
    switch (a[0]) {
      case K_RMS_NORM:
        xllm_rms_norm(P(1), a[2], a[3], a[4], P(5), P(6), P(7), P(8), a[9], a[10], f32_of(a[11]), (int)a[12]);
        break;
      case K_ROTARY:
        xllm_rotary(P(1), P(2), a[3], a[4], a[5], P(6), a[7], a[8], a[9], P(10), a[11], a[12], (int)a[13]);
        break;
      case K_SILU_AND_MUL:
        xllm_silu_and_mul(P(1), P(2), a[3], a[4], (int)a[5]);
        break;
      case K_CACHE_WRITE:
        if (xllm_cache_write(P(1), a[2], P(3), a[4], P(5), P(6), P(7), a[8], a[9], a[10]) != 0) return -1;
        break;
      case K_PAGED_DECODE:
        if (xllm_paged_decode(P(1), a[2], P(3), P(4), P(5), a[6], P(7), P(8), a[9], a[10], a[11], a[12],
                              a[13], a[14], f32_of(a[15]), a[16], (int)a[17]) != 0)
          return -1;
        break;
      case K_LINEAR:
        xllm_linear(P(1), a[2], P(3), P(4), P(5), a[6], a[7], a[8], a[9], (int)a[10]);
        break;
      case K_EMBEDDING:
        if (xllm_embedding(P(1), P(2), P(3), a[4], a[5], a[6]) != 0) return -1;
        break;
      case K_Q8_LINEAR:
        ((q8_linear_fn)P(1))(P(2), P(3), P(4), P(5), P(6), a[7], a[8], a[9], a[10], (int)a[11]);
        break;
      default:
        return -2;
    }
  }
  return 0;
}

// A float32 GEMM for the per-step products, C[m, n] (+)= A[m, k] @ W^T, with W [n, k] packed
// once per op call and m small (a step's batch rows, 1 to a few hundred).
//
// Why not MKL: at these shapes MKL's sgemm (packed B included) re-copies A into its own
// layout for every panel of W; that copy was ~28 % of a [64, 1024] x [1024, 2048] product,
// which ran at ~60 GFLOP/s on one Zen 3 core. This kernel reads A in place and runs the same
// product at ~70 (and [32, 256] x [256, 1024] at ~85 against MKL's ~60).
//
// Layout (Goto-style, one level): K is cut into blocks of kKc; within a block, W^T is cut
// into strips of kNr = 16 columns, each stored [kc][16] contiguously (16 KiB: one strip stays
// in L1 while every row block of A streams past it). The last strip is zero-padded. The
// micro-kernel keeps a [kMr = 6, 16] tile of C in 12 AVX2 registers, and per k broadcasts 6
// values of A against 2 vectors of the strip (12 FMAs).
//
// Sum order: per element, each K block is summed from zero in p order, then added to C (to
// the previous blocks' sum, or to C's old value when accumulating). It depends on neither
// m nor the thread split, so results are bit-for-bit the same however the work is divided.
//
// x86-64 with AVX2+FMA only (checked at run time); elsewhere StepWeight keeps the BLAS.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RNNEXT_HAVE_PACKED_GEMM 1
#define RNNEXT_AVX2 __attribute__((target("avx2,fma")))
#else
#define RNNEXT_HAVE_PACKED_GEMM 0
#endif

namespace rnnext {
namespace cpu {
namespace packed_gemm {

constexpr int64_t kKc = 256, kNr = 16, kMr = 6;

inline bool supported() {
#if RNNEXT_HAVE_PACKED_GEMM
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Floats of the packed form of a [n, k] weight.
inline int64_t packed_size(int64_t n, int64_t k) { return (n + kNr - 1) / kNr * kNr * k; }

// Strip j0 of K block p0 starts at p0 * n_pad + j0 * kc (kc = the block's depth).
inline int64_t strip_offset(int64_t p0, int64_t j0, int64_t kc, int64_t n_pad) { return p0 * n_pad + j0 * kc; }

// Packs W (element (j, p) at w[j * s_j + p * s_p]: any strides, so a transposed view packs
// from its storage) into `out` [packed_size(n, k)].
inline void pack(const float* w, int64_t n, int64_t k, int64_t s_j, int64_t s_p, float* out) {
  const int64_t n_pad = (n + kNr - 1) / kNr * kNr;
  for (int64_t p0 = 0; p0 < k; p0 += kKc) {
    const int64_t kc = std::min(kKc, k - p0);
    for (int64_t j0 = 0; j0 < n_pad; j0 += kNr) {
      float* strip = out + strip_offset(p0, j0, kc, n_pad);
      const int64_t cols = std::min(kNr, n - j0);
      for (int64_t p = 0; p < kc; ++p) {
        float* dst = strip + p * kNr;
        const float* src = w + (p0 + p) * s_p + j0 * s_j;
        for (int64_t jj = 0; jj < cols; ++jj) dst[jj] = src[jj * s_j];
        for (int64_t jj = cols; jj < kNr; ++jj) dst[jj] = 0.f;
      }
    }
  }
}

#if RNNEXT_HAVE_PACKED_GEMM
// C[R, 16] = (add ? C : 0) + A[R, kc] @ strip[kc, 16]; rows of A at stride lda.
template <int R>
RNNEXT_AVX2 __attribute__((always_inline)) inline void micro_kernel(int64_t kc, const float* a, int64_t lda,
                                                                    const float* strip, float* c, int64_t ldc,
                                                                    bool add, const float* prefetch) {
  static_assert(R >= 1 && R <= kMr, "rows per micro-kernel");
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  for (int64_t p = 0; p < kc; ++p) {
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(prefetch + p * kNr), _MM_HINT_T0);
    const __m256 b0 = _mm256_loadu_ps(strip + p * kNr), b1 = _mm256_loadu_ps(strip + p * kNr + 8);
#define RNNEXT_FMA_ROW(r)                                  \
  if constexpr (R > r) {                                   \
    const __m256 av = _mm256_broadcast_ss(a##r + p);       \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);            \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);            \
  }
    RNNEXT_FMA_ROW(0) RNNEXT_FMA_ROW(1) RNNEXT_FMA_ROW(2) RNNEXT_FMA_ROW(3) RNNEXT_FMA_ROW(4) RNNEXT_FMA_ROW(5)
#undef RNNEXT_FMA_ROW
  }
#define RNNEXT_STORE_ROW(r)                                                          \
  if constexpr (R > r) {                                                             \
    float* cr = c + r * ldc;                                                         \
    if (add) {                                                                       \
      c##r##0 = _mm256_add_ps(_mm256_loadu_ps(cr), c##r##0);                         \
      c##r##1 = _mm256_add_ps(_mm256_loadu_ps(cr + 8), c##r##1);                     \
    }                                                                                \
    _mm256_storeu_ps(cr, c##r##0);                                                   \
    _mm256_storeu_ps(cr + 8, c##r##1);                                               \
  }
  RNNEXT_STORE_ROW(0) RNNEXT_STORE_ROW(1) RNNEXT_STORE_ROW(2) RNNEXT_STORE_ROW(3) RNNEXT_STORE_ROW(4)
  RNNEXT_STORE_ROW(5)
#undef RNNEXT_STORE_ROW
}

// Rows [0, m) of one strip, kMr at a time; `cols` < 16 only for the last, padded strip,
// which goes through a [kMr, 16] buffer so nothing past column n is touched. The strip after
// this one is prefetched (the hardware prefetcher restarts at every strip): by the first row
// block, one line per k, when the weight is read from cache; spread evenly over all the row
// blocks when it streams from memory (`streaming`), so the requests are not all outstanding
// at once (measured: large LSTM/GRU forwards 4-12 % faster, cache-resident ones 2-3 %
// slower, hence the choice).
RNNEXT_AVX2 inline void strip_rows(int64_t m, int64_t kc, const float* a, int64_t lda, const float* strip, float* c,
                                   int64_t ldc, bool add, int64_t cols, const float* next_strip, bool streaming) {
  for (int64_t i = 0, r = 0; i < m; i += r) {
    // kMr rows at a time, but never a last block of 1-3 rows after a full one: with fewer
    // than 8 accumulators the FMA latency, not the FMA units, sets the pace (a 2-row block
    // runs at half speed). 7, 8, 9 rows left go as 4+3, 4+4, 5+4.
    const int64_t left = m - i;
    r = left > kMr && left < kMr + 4 ? left - 4 + (left == kMr + 1) : std::min(kMr, left);
    const float* ai = a + i * lda;
    float* ci = c + i * ldc;
    float tile[kMr * kNr];
    float* dst = cols == kNr ? ci : tile;
    const int64_t ld = cols == kNr ? ldc : kNr;
    const bool add_here = cols == kNr && add;
    const float* pf = i == 0 && !streaming ? next_strip : nullptr;
    if (streaming && next_strip) {
      // This block's share of the next strip's kc lines (64 bytes, one k, each).
      for (int64_t line = i * kc / m; line < (i + r) * kc / m; ++line) {
        _mm_prefetch(reinterpret_cast<const char*>(next_strip + line * kNr), _MM_HINT_T0);
      }
    }
    switch (r) {
      case 6: micro_kernel<6>(kc, ai, lda, strip, dst, ld, add_here, pf); break;
      case 5: micro_kernel<5>(kc, ai, lda, strip, dst, ld, add_here, pf); break;
      case 4: micro_kernel<4>(kc, ai, lda, strip, dst, ld, add_here, pf); break;
      case 3: micro_kernel<3>(kc, ai, lda, strip, dst, ld, add_here, pf); break;
      case 2: micro_kernel<2>(kc, ai, lda, strip, dst, ld, add_here, pf); break;
      default: micro_kernel<1>(kc, ai, lda, strip, dst, ld, add_here, pf); break;
    }
    if (cols != kNr) {
      for (int64_t rr = 0; rr < r; ++rr) {
        for (int64_t jj = 0; jj < cols; ++jj) ci[rr * ldc + jj] = (add ? ci[rr * ldc + jj] : 0.f) + tile[rr * kNr + jj];
      }
    }
  }
}

// C[m, n] (+)= A[m, k] @ W^T for strips [s0, s1) of the packed W.
RNNEXT_AVX2 inline void multiply_strips(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                                        const float* packed, bool accumulate, float* c, int64_t ldc, int64_t s0,
                                        int64_t s1, bool streaming) {
  const int64_t n_pad = (n + kNr - 1) / kNr * kNr;
  for (int64_t p0 = 0; p0 < k; p0 += kKc) {
    const int64_t kc = std::min(kKc, k - p0);
    const bool add = accumulate || p0 > 0;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t j0 = s * kNr;
      const float* strip = packed + strip_offset(p0, j0, kc, n_pad);
      const float* next_strip = s + 1 < s1 ? strip + kc * kNr : nullptr;
      strip_rows(m, kc, a + p0, lda, strip, c + j0, ldc, add, std::min(kNr, n - j0), next_strip, streaming);
    }
  }
}
#endif

// C[m, n] (+)= A[m, k] @ W^T, W packed by pack(). Inside a parallel region it runs on the
// calling thread; outside, a large enough product splits its strips across threads.
// `streaming`: W is not expected in cache (see strip_rows).
inline void multiply(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* packed,
                     bool accumulate, float* c, int64_t ldc, bool streaming = false) {
#if RNNEXT_HAVE_PACKED_GEMM
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
    }
    return;
  }
  const int64_t strips = (n + kNr - 1) / kNr;
  // ~2^17 multiply-adds per task, some tens of microseconds.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, m * k * kNr));
  if (at::in_parallel_region() || strips <= grain) {
    multiply_strips(m, n, k, a, lda, packed, accumulate, c, ldc, 0, strips, streaming);
  } else {
    at::parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) {
      multiply_strips(m, n, k, a, lda, packed, accumulate, c, ldc, s0, s1, streaming);
    });
  }
#else
  TORCH_CHECK(false, "rnnext: the packed float32 GEMM is not built for this CPU");
#endif
}

}  // namespace packed_gemm
}  // namespace cpu
}  // namespace rnnext

// A float32 GEMM for the per-step products, C[m, n] (+)= A[m, k] @ W^T, with W [n, k] packed
// once per op call and m small (a step's batch rows, 1 to a few hundred).
//
// Why not MKL: at these shapes MKL's sgemm (packed B included) re-copies A into its own
// layout for every panel of W; that copy was ~28 % of a [64, 1024] x [1024, 2048] product,
// which ran at ~60 GFLOP/s on one Zen 3 core. This kernel reads A in place and runs the same
// product at ~70 (and [32, 256] x [256, 1024] at ~85 against MKL's ~60).
//
// Layout (Goto-style, one level): K is cut into blocks of kKc; within a block, W^T is cut
// into strips of kNr = 16 columns, each stored [kc][16] contiguously (16 KiB), and a block's
// strips follow each other. The last strip is zero-padded. Two micro-kernels read it:
//  * AVX2: a [kMr = 6, 16] tile of C in 12 registers; per k, 6 broadcasts of A against the
//    strip's 2 vectors (12 FMAs). One strip stays in L1 while every row block streams past.
//  * AVX-512: a [r <= 9, 48] tile (three adjacent strips, 27 of the 32 registers); per k,
//    r broadcasts against 3 vectors (3r FMAs): a third of the loads of A per multiply-add,
//    and fewer instructions. A last partial strip is read and written through lane masks.
//
// Sum order: per element, each K block is summed from zero in p order, then added to C (to
// the previous blocks' sum, or to C's old value when accumulating, or for the first block to
// the bias when there is one). It depends on neither
// m, nor the thread split, nor the kernel, so results are bit-for-bit the same however the
// work is divided and whichever kernel runs.
//
// x86-64 with AVX2+FMA (checked at run time) at least; elsewhere StepWeight keeps the BLAS.
// The kernel is the widest the CPU has unless RNNEXT_OWN_GEMM says otherwise (options.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RNNEXT_HAVE_PACKED_GEMM 1
#define RNNEXT_AVX2 __attribute__((target("avx2,fma")))
#define RNNEXT_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define RNNEXT_HAVE_PACKED_GEMM 0
#endif

namespace rnnext {
namespace cpu {
namespace packed_gemm {

constexpr int64_t kKc = 256, kNr = 16, kMr = 6;

// Which micro-kernel multiply() runs. kNone: the own GEMM is off (StepWeight uses the BLAS).
enum class Kernel : int { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* kernel_name(Kernel k) {
  return k == Kernel::kAvx512 ? "avx512" : k == Kernel::kAvx2 ? "avx2" : "blas";
}

inline bool cpu_supports(Kernel k) {
#if RNNEXT_HAVE_PACKED_GEMM
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  return k == Kernel::kNone || (k == Kernel::kAvx2 && avx2) || (k == Kernel::kAvx512 && avx512);
#else
  return k == Kernel::kNone;
#endif
}

inline Kernel widest_kernel() {
  return cpu_supports(Kernel::kAvx512) ? Kernel::kAvx512 : cpu_supports(Kernel::kAvx2) ? Kernel::kAvx2 : Kernel::kNone;
}

// "auto" (also "1": the widest this CPU has), "avx512", "avx2" or "blas" (also "0": the own
// GEMM off) -> the kernel; an unknown name, or a kernel this CPU lacks, is an error naming both.
inline Kernel parse_kernel(const std::string& name, const char* what) {
  Kernel k;
  if (name == "auto" || name == "1") {
    k = widest_kernel();
  } else if (name == "avx512") {
    k = Kernel::kAvx512;
  } else if (name == "avx2") {
    k = Kernel::kAvx2;
  } else if (name == "blas" || name == "0") {
    k = Kernel::kNone;
  } else {
    TORCH_CHECK_VALUE(false, "rnnext: ", what, "='", name, "': expected auto, avx512, avx2 or blas");
  }
  TORCH_CHECK_VALUE(cpu_supports(k), "rnnext: ", what, "='", name, "': this CPU has no ", kernel_name(k),
                    " (the widest it has: ", kernel_name(widest_kernel()), ")");
  return k;
}

// C[m, n] = the bias in every row, or zeros (a product with k = 0).
inline void fill_bias_rows(int64_t m, int64_t n, const float* bias, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    if (bias) {
      std::memcpy(c + i * ldc, bias, sizeof(float) * n);
    } else {
      std::memset(c + i * ldc, 0, sizeof(float) * n);
    }
  }
}

// Floats of the packed form of a [n, k] weight.
inline int64_t packed_size(int64_t n, int64_t k) { return (n + kNr - 1) / kNr * kNr * k; }

// Strip j0 of K block p0 starts at p0 * n_pad + j0 * kc (kc = the block's depth).
inline int64_t strip_offset(int64_t p0, int64_t j0, int64_t kc, int64_t n_pad) { return p0 * n_pad + j0 * kc; }

#if RNNEXT_HAVE_PACKED_GEMM
// out[c * 16 + r] = rows[r][c] for r, c < 16: a 16 x 16 tile transposed in registers (32-bit,
// then 64-bit interleaves within 128-bit lanes, then two rounds of 128-bit lane shuffles).
RNNEXT_AVX512 inline void transpose_16x16(const float* const* rows, int64_t offset, float* out) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows[i] + offset);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4 i + c], lane L: column 4 L + c of rows 4 i .. 4 i + 3
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);       // columns c, 8 + c of rows 0-7
    t[c + 4] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);   // columns 4 + c, 12 + c
    t[c + 8] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);  // rows 8-15
    t[c + 12] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    _mm512_storeu_ps(out + c * 16, _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88));
    _mm512_storeu_ps(out + (c + 8) * 16, _mm512_shuffle_f32x4(t[c], t[c + 8], 0xdd));
    _mm512_storeu_ps(out + (c + 4) * 16, _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0x88));
    _mm512_storeu_ps(out + (c + 12) * 16, _mm512_shuffle_f32x4(t[c + 4], t[c + 12], 0xdd));
  }
}
#endif

// Packs W (element (j, p) at w[j * s_j + p * s_p]: any strides, so a transposed view packs
// from its storage) into `out` [packed_size(n, k)]. With group_rows > 0, W's rows come in
// groups of group_rows, group g starting at w + g * group_stride (a unit block's rows of
// every gate of W_hh, packed without first copying them together). Strips are independent
// and split across threads. A row-major W (s_p == 1) is read row by row, each row's run of a
// K block contiguous, and written 16 floats apart within its strip (which stays in L1):
// reading the 16 rows of a strip element by element instead packed a [4096, 1024] weight in
// ~5 ms on one Zen 4 thread, 3% of an LSTM T=50, B=64, H=1024 forward, which packs two.
// With AVX-512, a whole strip's rows go 16 values of each at a time through transpose_16x16.
inline void pack(const float* w, int64_t n, int64_t k, int64_t s_j, int64_t s_p, float* out, int64_t group_rows = 0,
                 int64_t group_stride = 0) {
  const int64_t n_pad = (n + kNr - 1) / kNr * kNr;
  [[maybe_unused]] const bool avx512 = cpu_supports(Kernel::kAvx512);
  auto row = [&](int64_t j) {
    return group_rows > 0 ? w + (j / group_rows) * group_stride + (j % group_rows) * s_j : w + j * s_j;
  };
  at::parallel_for(0, n_pad / kNr, 1, [&](int64_t strip0, int64_t strip1) {
    for (int64_t p0 = 0; p0 < k; p0 += kKc) {
      const int64_t kc = std::min(kKc, k - p0);
      for (int64_t j0 = strip0 * kNr; j0 < strip1 * kNr; j0 += kNr) {
        float* strip = out + strip_offset(p0, j0, kc, n_pad);
        const int64_t cols = std::min(kNr, n - j0);
        if (s_p == 1) {
          int64_t done = 0;  // the values of p already packed, for every row of the strip
#if RNNEXT_HAVE_PACKED_GEMM
          if (cols == kNr && avx512) {
            const float* rows[kNr];
            for (int64_t jj = 0; jj < kNr; ++jj) rows[jj] = row(j0 + jj) + p0;
            for (; done + 16 <= kc; done += 16) transpose_16x16(rows, done, strip + done * kNr);
          }
#endif
          for (int64_t jj = 0; jj < cols; ++jj) {
            const float* src = row(j0 + jj) + p0;
            for (int64_t p = done; p < kc; ++p) strip[p * kNr + jj] = src[p];
          }
        } else {
          // (a transposed view: a strip's 16 values of one p are contiguous when s_j == 1)
          for (int64_t p = 0; p < kc; ++p) {
            for (int64_t jj = 0; jj < cols; ++jj) strip[p * kNr + jj] = row(j0 + jj)[(p0 + p) * s_p];
          }
        }
        for (int64_t p = 0; p < kc; ++p) {
          for (int64_t jj = cols; jj < kNr; ++jj) strip[p * kNr + jj] = 0.f;
        }
      }
    }
  });
}

#if RNNEXT_HAVE_PACKED_GEMM
// C[R, 16] = (add ? C : bias ? bias : 0) + A[R, kc] @ strip[kc, 16]; rows of A at stride lda;
// bias: 16 values added to every row (or nullptr).
template <int R>
RNNEXT_AVX2 __attribute__((always_inline)) inline void micro_kernel(int64_t kc, const float* a, int64_t lda,
                                                                    const float* strip, float* c, int64_t ldc,
                                                                    bool add, const float* bias,
                                                                    const float* prefetch) {
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
    const float* base = add ? cr : bias;                                             \
    if (base) {                                                                      \
      c##r##0 = _mm256_add_ps(_mm256_loadu_ps(base), c##r##0);                       \
      c##r##1 = _mm256_add_ps(_mm256_loadu_ps(base + 8), c##r##1);                   \
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
                                   int64_t ldc, bool add, const float* bias, int64_t cols, const float* next_strip,
                                   bool streaming) {
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
    const float* bias_here = cols == kNr && !add ? bias : nullptr;
    const float* pf = i == 0 && !streaming ? next_strip : nullptr;
    if (streaming && next_strip) {
      // This block's share of the next strip's kc lines (64 bytes, one k, each).
      for (int64_t line = i * kc / m; line < (i + r) * kc / m; ++line) {
        _mm_prefetch(reinterpret_cast<const char*>(next_strip + line * kNr), _MM_HINT_T0);
      }
    }
    switch (r) {
      case 6: micro_kernel<6>(kc, ai, lda, strip, dst, ld, add_here, bias_here, pf); break;
      case 5: micro_kernel<5>(kc, ai, lda, strip, dst, ld, add_here, bias_here, pf); break;
      case 4: micro_kernel<4>(kc, ai, lda, strip, dst, ld, add_here, bias_here, pf); break;
      case 3: micro_kernel<3>(kc, ai, lda, strip, dst, ld, add_here, bias_here, pf); break;
      case 2: micro_kernel<2>(kc, ai, lda, strip, dst, ld, add_here, bias_here, pf); break;
      default: micro_kernel<1>(kc, ai, lda, strip, dst, ld, add_here, bias_here, pf); break;
    }
    if (cols != kNr) {
      for (int64_t rr = 0; rr < r; ++rr) {
        for (int64_t jj = 0; jj < cols; ++jj) {
          ci[rr * ldc + jj] = (add ? ci[rr * ldc + jj] : bias ? bias[jj] : 0.f) + tile[rr * kNr + jj];
        }
      }
    }
  }
}

// C[m, n] (+)= A[m, k] @ W^T (+ bias) for strips [s0, s1) of the packed W.
RNNEXT_AVX2 inline void multiply_strips(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                                        const float* packed, bool accumulate, const float* bias, float* c,
                                        int64_t ldc, int64_t s0, int64_t s1, bool streaming) {
  const int64_t n_pad = (n + kNr - 1) / kNr * kNr;
  for (int64_t p0 = 0; p0 < k; p0 += kKc) {
    const int64_t kc = std::min(kKc, k - p0);
    const bool add = accumulate || p0 > 0;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t j0 = s * kNr;
      const float* strip = packed + strip_offset(p0, j0, kc, n_pad);
      const float* next_strip = s + 1 < s1 ? strip + kc * kNr : nullptr;
      strip_rows(m, kc, a + p0, lda, strip, c + j0, ldc, add, bias ? bias + j0 : nullptr, std::min(kNr, n - j0),
                 next_strip, streaming);
    }
  }
}

// acc = 0: an AVX-512 tile of R x NV accumulators.
template <int R, int NV>
RNNEXT_AVX512 __attribute__((always_inline)) inline void zero_tile_512(__m512 (&acc)[R][NV]) {
#pragma GCC unroll 9
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
}

// C[R, up to 16 NV] = (add ? C : bias ? bias : 0) + acc: an AVX-512 tile stored (bias: the
// columns' values, added to every row, or nullptr); lanes of the last vector past last_mask
// are neither read nor written.
template <int R, int NV>
RNNEXT_AVX512 __attribute__((always_inline)) inline void store_tile_512(__m512 (&acc)[R][NV], float* c, int64_t ldc,
                                                                      bool add, const float* bias,
                                                                      __mmask16 last_mask) {
#pragma GCC unroll 9
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* cr = c + r * ldc + v * kNr;
      const __mmask16 mask = v == NV - 1 ? last_mask : __mmask16(0xFFFF);
      const float* base = add ? cr : bias ? bias + v * kNr : nullptr;
      if (base) acc[r][v] = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, base), acc[r][v]);
      _mm512_mask_storeu_ps(cr, mask, acc[r][v]);
    }
  }
}

// AVX-512: C[R, up to 16 NV] = (add ? C : bias ? bias : 0) + A[R, kc] @ NV adjacent strips
// (strip v at strip + v * kc * kNr; bias: the columns' values, added to every row, or
// nullptr); lanes of the last vector past `last_mask` are neither read nor written (a
// partial last strip). `prefetch`: the next group's strips, a line per k each.
template <int R, int NV>
RNNEXT_AVX512 __attribute__((always_inline)) inline void micro_kernel_512(int64_t kc, const float* a, int64_t lda,
                                                                        const float* strip, float* c, int64_t ldc,
                                                                        bool add, const float* bias,
                                                                        __mmask16 last_mask,
                                                                        const float* prefetch) {
  static_assert(R >= 1 && R * NV <= 28, "a tile of at most 28 accumulators");
  __m512 acc[R][NV];
  zero_tile_512<R, NV>(acc);
  const int64_t strip_stride = kc * kNr;
  for (int64_t p = 0; p < kc; ++p) {
    if (prefetch) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + v * strip_stride + p * kNr), _MM_HINT_T0);
      }
    }
    __m512 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(strip + v * strip_stride + p * kNr);
#pragma GCC unroll 9
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + p]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, b[v], acc[r][v]);
    }
  }
  store_tile_512<R, NV>(acc, c, ldc, add, bias, last_mask);
}

// The AVX-512 tile: kGroup512 strips (48 columns) by up to kMr512 rows, 27 accumulators
// (with the 3 vectors of W and a broadcast of A, 31 of the 32 registers). Below 4 rows it
// is 4 strips wide, so that it still has 4+ independent accumulators (FMA latency, not
// throughput, would set the pace). Measured on Zen 4 (one thread, GFLOP/s, AVX2 kernel
// first): [32, 256] x [256, 1024] 111 / 116; [64, 1024] x [1024, 4096] 94 / 100 (the weight
// from L3); [8, 512] x [512, 2048] 88 / 115; [1, 64] x [64, 256] 37 / 47. Tiles of 2 strips
// by 12 rows measured 0.92-0.98 of the AVX2 kernel there; of 4 by 6 or 7, and 5 by 5,
// between the two.
constexpr int kGroup512 = 3, kMr512 = 9, kGroup512FewRows = 4;

template <int NV>
RNNEXT_AVX512 inline void rows_512(int64_t r, int64_t kc, const float* a, int64_t lda, const float* strip,
                                   float* c, int64_t ldc, bool add, const float* bias, __mmask16 mask,
                                   const float* pf) {
  switch (r) {
#define RNNEXT_ROWS_CASE(R)                                                                      \
  case R:                                                                                        \
    if constexpr (R * NV <= 28) micro_kernel_512<R, NV>(kc, a, lda, strip, c, ldc, add, bias, mask, pf); \
    break;
    RNNEXT_ROWS_CASE(1) RNNEXT_ROWS_CASE(2) RNNEXT_ROWS_CASE(3) RNNEXT_ROWS_CASE(4) RNNEXT_ROWS_CASE(5)
    RNNEXT_ROWS_CASE(6) RNNEXT_ROWS_CASE(7) RNNEXT_ROWS_CASE(8) RNNEXT_ROWS_CASE(9)
#undef RNNEXT_ROWS_CASE
    default: break;
  }
}

// Rows [0, m) of a group of NV strips (their columns j0 on), in row blocks of at most
// min(kMr512, 28 / NV) rows, as even as possible (3 strips by 64 rows: 8 blocks of 8; 13
// rows: 7 and 6, not 9 and 4). Each row block runs through every K block before the next
// row block starts: its tile of C is added to while it is still in L1, and what is read
// again per row block is the group's strips (48 columns by k: 192 KiB at k = 1024, in L2).
// The sum order is that of K block by K block over all of C. Measured on Zen 4 (two threads,
// GFLOP/s, K blocks outermost / row blocks outermost): [512, 1024] x [1024, 4096] 199 / 220
// (C [512, 2048] per thread, 4 MiB, was read and written once per K block, from L3);
// 16 weights [256, 1024] in turn (16 MiB, from L3) times [m, 1024]: m = 64 209 / 215,
// m = 16 205 / 209, m = 8 192 / 194.
// The first row block prefetches the next group (a line per k per strip) when it is as wide.
// The AVX2 path's prefetch of a streamed weight spread over the row blocks made this kernel
// slower on Zen 4 (LSTM T=50 B=64 H=1024 forward 0.92x, GRU 0.93x), so it has none.
template <int NV>
RNNEXT_AVX512 inline void group_rows_512(int64_t m, int64_t k, const float* a, int64_t lda, const float* packed,
                                         int64_t n_pad, int64_t j0, float* c, int64_t ldc, bool accumulate,
                                         const float* bias, int64_t cols, bool prefetch_next) {
  constexpr int64_t max_rows = 28 / NV < kMr512 ? 28 / NV : kMr512;
  const int64_t blocks = (m + max_rows - 1) / max_rows;
  const __mmask16 mask = static_cast<__mmask16>((1u << (cols - (NV - 1) * kNr)) - 1u);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i = m * blk / blocks, r = m * (blk + 1) / blocks - i;
    for (int64_t p0 = 0; p0 < k; p0 += kKc) {
      const int64_t kc = std::min(kKc, k - p0);
      const float* group = packed + strip_offset(p0, j0, kc, n_pad);
      rows_512<NV>(r, kc, a + i * lda + p0, lda, group, c + i * ldc, ldc, accumulate || p0 > 0, bias, mask,
                   blk == 0 && prefetch_next ? group + NV * kc * kNr : nullptr);
    }
  }
}

// multiply_strips with the AVX-512 tile: strips [s0, s1) in groups of kGroup512 (of
// kGroup512FewRows below 4 rows); a last group may be narrower.
RNNEXT_AVX512 inline void multiply_strips_512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                                              const float* packed, bool accumulate, const float* bias, float* c,
                                              int64_t ldc, int64_t s0, int64_t s1) {
  const int64_t n_pad = (n + kNr - 1) / kNr * kNr;
  const int64_t width = m < 4 ? kGroup512FewRows : kGroup512;
  for (int64_t s = s0; s < s1; s += width) {
    const int64_t nv = std::min(width, s1 - s), j0 = s * kNr;
    const bool prefetch_next = s + nv + nv <= s1;
    const int64_t cols = std::min(nv * kNr, n - j0);
    const float* bj = bias ? bias + j0 : nullptr;
    float* cj = c + j0;
    switch (nv) {
      case 4: group_rows_512<4>(m, k, a, lda, packed, n_pad, j0, cj, ldc, accumulate, bj, cols, prefetch_next); break;
      case 3: group_rows_512<3>(m, k, a, lda, packed, n_pad, j0, cj, ldc, accumulate, bj, cols, prefetch_next); break;
      case 2: group_rows_512<2>(m, k, a, lda, packed, n_pad, j0, cj, ldc, accumulate, bj, cols, prefetch_next); break;
      default: group_rows_512<1>(m, k, a, lda, packed, n_pad, j0, cj, ldc, accumulate, bj, cols, prefetch_next); break;
    }
  }
}
#endif

// C[m, n] = (accumulate ? C : bias ? bias : 0) + A[m, k] @ W^T, W packed by pack(), bias
// [n] added to every row (or nullptr; not with accumulate), with `kernel` (not kNone; one
// the CPU has). The bias is added where the tile is stored, as a copy of it into C first
// would be (the same bits), without writing and reading C an extra time. Inside a parallel
// region it runs on the calling thread; outside, a large enough product splits its strips
// across threads. `streaming`: W is not expected in cache, which
// changes the AVX2 kernel's prefetch (see strip_rows); the AVX-512 kernel ignores it (see
// group_rows_512).
inline void multiply(Kernel kernel, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                     const float* packed, bool accumulate, float* c, int64_t ldc, bool streaming = false,
                     const float* bias = nullptr) {
#if RNNEXT_HAVE_PACKED_GEMM
  // Callers pass a kernel parse_kernel accepted (options.h, step_gemm.cpp): this CPU has it.
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(kernel != Kernel::kNone && cpu_supports(kernel));
  if (m == 0 || n == 0) return;
  TORCH_CHECK(!(accumulate && bias), "rnnext: the packed GEMM takes a bias or accumulates, not both");
  if (k == 0) {
    if (!accumulate) fill_bias_rows(m, n, bias, c, ldc);
    return;
  }
  const int64_t strips = (n + kNr - 1) / kNr;
  auto run = [&](int64_t s0, int64_t s1) {
    if (kernel == Kernel::kAvx512) {
      multiply_strips_512(m, n, k, a, lda, packed, accumulate, bias, c, ldc, s0, s1);
    } else {
      multiply_strips(m, n, k, a, lda, packed, accumulate, bias, c, ldc, s0, s1, streaming);
    }
  };
  // ~2^17 multiply-adds per task, some tens of microseconds; for the AVX-512 kernel a whole
  // number of its strip groups, so that they are seldom cut (a cut group only runs narrower).
  int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, m * k * kNr));
  if (kernel == Kernel::kAvx512) grain = (grain + kGroup512 - 1) / kGroup512 * kGroup512;
  if (at::in_parallel_region() || strips <= grain) {
    run(0, strips);
  } else {
    at::parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) { run(s0, s1); });
  }
#else
  TORCH_CHECK(false, "rnnext: the packed float32 GEMM is not built for this CPU");
#endif
}

}  // namespace packed_gemm
}  // namespace cpu
}  // namespace rnnext

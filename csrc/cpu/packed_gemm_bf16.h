// The input projection of bfloat16 layers on CPUs with AVX512-BF16:
// C[m, n] = (bias or 0) + A[m, k] @ W^T, A and W bfloat16, C and the bias float32.
//
// A bfloat16 layer's x and W_ih are bfloat16 to begin with, so this product rounds nothing
// of its own: VDPBF16PS multiplies two pairs of bfloat16 exactly (two 8-bit significands fit
// float32's 24) and adds both products to a float32 lane, rounding after each add, as the
// float32 kernel's FMAs do on the widened values; but 32 multiply-adds per instruction, not
// 16 (Zen 4, one core: 233 against 117 GFLOP/s). It reads denormal bfloat16 inputs as zero
// and flushes denormal sums to zero (magnitudes below 1.2e-38), which the float32 kernel
// keeps. The recurrent product h_prev @ W_hh^T stays float32: its h_prev is the float32
// state, which this would have to round to bfloat16 (as torch.nn's oneDNN LSTM does).
//
// Layout: W^T in strips of kNr = 16 columns, the last zero-padded. A strip stores, for each
// pair q of k (2q, 2q + 1), its 16 columns' two values side by side: [ceil(k / 2)][16][2]
// bfloat16, 64 bytes per q; an odd k's last pair is padded with zero. No K blocks: a strip
// of k = 1024 is 32 KiB. The tile is the float32 AVX-512 kernel's (packed_gemm.h): 3 strips
// by up to 9 rows, 4 strips below 4 rows.
//
// Sum order per element: the pairs in q order, each pair's 2q + 1 first (the instruction's
// order), then the bias. It depends on neither m nor the thread split, so results are the
// same bits however the work is divided.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "options.h"
#include "packed_gemm.h"
#include "scratch.h"

#if RNNEXT_HAVE_PACKED_GEMM && (defined(__clang__) || __GNUC__ >= 10)
#define RNNEXT_HAVE_BF16_GEMM 1
#define RNNEXT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma")))
#else
#define RNNEXT_HAVE_BF16_GEMM 0
#endif

namespace rnnext {
namespace cpu {
namespace packed_gemm {

// Whether this CPU has the bfloat16 dot product (AVX512-BF16).
inline bool cpu_has_bf16_dot() {
#if RNNEXT_HAVE_BF16_GEMM
  static const bool has = cpu_supports(Kernel::kAvx512) && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// bfloat16 values of the packed form of a [n, k] weight.
inline int64_t packed_size_bf16(int64_t n, int64_t k) { return (n + kNr - 1) / kNr * kNr * ((k + 1) / 2 * 2); }

// Packs W [n, k] (row j at w + j * ld, its k values contiguous; with group_rows > 0 the rows
// come in groups of group_rows, group g at w + g * group_stride, as pack() reads a unit
// block's rows of every gate) into `out` [packed_size_bf16(n, k)]. Strips split across
// threads. A strip's pairs are its 16 rows' 32-bit words transposed: a full strip goes 16
// pairs at a time through transpose_16x16 (as 32-bit values), the rest value by value.
inline void pack_bf16(const uint16_t* w, int64_t n, int64_t k, int64_t ld, uint16_t* out, int64_t group_rows = 0,
                      int64_t group_stride = 0) {
  const int64_t n_pad = (n + kNr - 1) / kNr * kNr, pairs = (k + 1) / 2, strip_size = pairs * 2 * kNr;
  if (strip_size == 0) return;  // k = 0: nothing to pack (and `out` may be null)
  auto row = [&](int64_t j) {
    return group_rows > 0 ? w + (j / group_rows) * group_stride + (j % group_rows) * ld : w + j * ld;
  };
  at::parallel_for(0, n_pad / kNr, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      uint16_t* strip = out + s * strip_size;
      const int64_t j0 = s * kNr, cols = std::min(kNr, n - j0);
      int64_t done = 0;  // pairs already packed, for every row of the strip
#if RNNEXT_HAVE_BF16_GEMM
      if (cols == kNr && cpu_has_bf16_dot()) {
        const float* words[kNr];
        for (int64_t jj = 0; jj < kNr; ++jj) words[jj] = reinterpret_cast<const float*>(row(j0 + jj));
        for (; 2 * (done + 16) <= k; done += 16) {
          transpose_16x16(words, done, reinterpret_cast<float*>(strip + done * 2 * kNr));
        }
      }
#endif
      std::memset(strip + done * 2 * kNr, 0, sizeof(uint16_t) * (strip_size - done * 2 * kNr));
      for (int64_t jj = 0; jj < cols; ++jj) {
        const uint16_t* src = row(j0 + jj);
        for (int64_t p = 2 * done; p < k; ++p) strip[(p / 2) * 2 * kNr + jj * 2 + (p & 1)] = src[p];
      }
    }
  });
}

#if RNNEXT_HAVE_BF16_GEMM
// acc[r][v] += A's pair q of row r (pair[r]: its two bfloat16, low half first) against pair q
// of strip v's 16 columns (strip v at strip + v * strip_size).
template <int R, int NV>
RNNEXT_AVX512_BF16 __attribute__((always_inline)) inline void dot_pair_bf16(__m512 (&acc)[R][NV], const uint16_t* strip,
                                                                          int64_t strip_size, int64_t q,
                                                                          const int32_t (&pair)[R]) {
  __m512i b[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(strip + v * strip_size + q * 2 * kNr);
#pragma GCC unroll 9
  for (int r = 0; r < R; ++r) {
    const __m512i av = _mm512_set1_epi32(pair[r]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)b[v]);
  }
}

// C[R, up to 16 NV] = (bias or 0) + A[R, k] @ NV adjacent strips (strip v at
// strip + v * strip_size); lanes of the last vector past last_mask are neither read nor written.
template <int R, int NV>
RNNEXT_AVX512_BF16 __attribute__((always_inline)) inline void micro_kernel_bf16(
    int64_t k, const uint16_t* a, int64_t lda, const uint16_t* strip, int64_t strip_size, float* c, int64_t ldc,
    const float* bias, __mmask16 last_mask) {
  static_assert(R >= 1 && R * NV <= 28, "a tile of at most 28 accumulators");
  __m512 acc[R][NV];
  zero_tile_512<R, NV>(acc);
  const int64_t full_pairs = k / 2;
  int32_t pair[R];
  for (int64_t q = 0; q < full_pairs; ++q) {
#pragma GCC unroll 9
    for (int r = 0; r < R; ++r) std::memcpy(&pair[r], a + r * lda + 2 * q, sizeof(int32_t));
    dot_pair_bf16<R, NV>(acc, strip, strip_size, q, pair);
  }
  if (k % 2) {
    // An odd k's last value alone, its pair's other half zero (reading past it could be past A).
#pragma GCC unroll 9
    for (int r = 0; r < R; ++r) pair[r] = a[r * lda + k - 1];
    dot_pair_bf16<R, NV>(acc, strip, strip_size, full_pairs, pair);
  }
  store_tile_512<R, NV>(acc, c, ldc, /*add=*/false, bias, last_mask);
}

// Rows [0, m) of a group of NV strips (columns j0 on), in row blocks as even as possible of
// at most min(kMr512, 28 / NV) rows (as group_rows_512).
template <int NV>
RNNEXT_AVX512_BF16 inline void group_rows_bf16(int64_t m, int64_t k, const uint16_t* a, int64_t lda,
                                               const uint16_t* strip, int64_t strip_size, float* c, int64_t ldc,
                                               const float* bias, int64_t cols) {
  constexpr int64_t max_rows = 28 / NV < kMr512 ? 28 / NV : kMr512;
  const int64_t blocks = (m + max_rows - 1) / max_rows;
  const __mmask16 mask = static_cast<__mmask16>((1u << (cols - (NV - 1) * kNr)) - 1u);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i = m * blk / blocks, r = m * (blk + 1) / blocks - i;
    const uint16_t* ai = a + i * lda;
    float* ci = c + i * ldc;
    switch (r) {
#define RNNEXT_ROWS_CASE(R)                                                                                \
  case R:                                                                                                  \
    if constexpr (R * NV <= 28) micro_kernel_bf16<R, NV>(k, ai, lda, strip, strip_size, ci, ldc, bias, mask); \
    break;
      RNNEXT_ROWS_CASE(1) RNNEXT_ROWS_CASE(2) RNNEXT_ROWS_CASE(3) RNNEXT_ROWS_CASE(4) RNNEXT_ROWS_CASE(5)
      RNNEXT_ROWS_CASE(6) RNNEXT_ROWS_CASE(7) RNNEXT_ROWS_CASE(8) RNNEXT_ROWS_CASE(9)
#undef RNNEXT_ROWS_CASE
      default: break;
    }
  }
}

// Strips [s0, s1) in groups of kGroup512 (kGroup512FewRows below 4 rows); a last group may be narrower.
RNNEXT_AVX512_BF16 inline void multiply_strips_bf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda,
                                                    const uint16_t* packed, const float* bias, float* c, int64_t ldc,
                                                    int64_t s0, int64_t s1) {
  const int64_t strip_size = (k + 1) / 2 * 2 * kNr;
  const int64_t width = m < 4 ? kGroup512FewRows : kGroup512;
  for (int64_t s = s0; s < s1; s += width) {
    const int64_t nv = std::min(width, s1 - s), j0 = s * kNr;
    const int64_t cols = std::min(nv * kNr, n - j0);
    const uint16_t* strip = packed + s * strip_size;
    const float* bj = bias ? bias + j0 : nullptr;
    switch (nv) {
      case 4: group_rows_bf16<4>(m, k, a, lda, strip, strip_size, c + j0, ldc, bj, cols); break;
      case 3: group_rows_bf16<3>(m, k, a, lda, strip, strip_size, c + j0, ldc, bj, cols); break;
      case 2: group_rows_bf16<2>(m, k, a, lda, strip, strip_size, c + j0, ldc, bj, cols); break;
      default: group_rows_bf16<1>(m, k, a, lda, strip, strip_size, c + j0, ldc, bj, cols); break;
    }
  }
}
#endif

// C[m, n] = (bias or 0) + A[m, k] @ W^T, W packed by pack_bf16, A's rows lda apart; on a
// CPU with the bfloat16 dot product (cpu_has_bf16_dot; callers check). Inside a parallel
// region it runs on the calling thread; outside, a large enough product splits its strips
// across threads as multiply() does.
inline void multiply_bf16(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* packed,
                          const float* bias, float* c, int64_t ldc) {
#if RNNEXT_HAVE_BF16_GEMM
  TORCH_CHECK(cpu_has_bf16_dot(), "rnnext: the bfloat16 GEMM needs AVX512-BF16, which this CPU lacks");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // (A and the packed W are empty)
    fill_bias_rows(m, n, bias, c, ldc);
    return;
  }
  const int64_t strips = (n + kNr - 1) / kNr;
  // ~2^18 multiply-adds per task (twice the float32 kernel's: twice as fast), whole groups.
  int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, m * k * kNr));
  grain = (grain + kGroup512 - 1) / kGroup512 * kGroup512;
  auto run = [&](int64_t s0, int64_t s1) { multiply_strips_bf16(m, n, k, a, lda, packed, bias, c, ldc, s0, s1); };
  if (at::in_parallel_region() || strips <= grain) {
    run(0, strips);
  } else {
    at::parallel_for(0, strips, grain, run);
  }
#else
  TORCH_CHECK(false, "rnnext: the bfloat16 GEMM is not built for this CPU");
#endif
}

}  // namespace packed_gemm

// A bfloat16 weight [n, k] packed for packed_gemm::multiply_bf16: the input projection's
// W_ih (or a unit block's rows of it) of a bfloat16 layer.
class Bf16StepWeight {
 public:
  // Whether a bfloat16 layer's input projection over `uses` steps takes it: this CPU has the
  // bfloat16 dot product, the bf16_gemm option is on, rnnext's own GEMMs are (own_gemm is not
  // blas), and the weight would be packed at all (StepWeight::kMinUsesToPack; a one- or
  // two-step call keeps the float32 routes).
  static bool takes(int64_t uses, int64_t min_uses) {
    return uses >= min_uses && options::bf16_gemm() && options::own_gemm() != packed_gemm::Kernel::kNone &&
           packed_gemm::cpu_has_bf16_dot();
  }

  // Rows [row0, row0 + n) of each of `groups` groups of group_rows rows of w (bfloat16,
  // contiguous [groups * group_rows, k]); the whole of w by default.
  explicit Bf16StepWeight(const at::Tensor& w, int64_t groups = 1, int64_t group_rows = -1, int64_t row0 = 0,
                          int64_t n = -1) {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(),
                "rnnext: Bf16StepWeight takes a contiguous 2-D bfloat16 weight");
    // Visible to the profiler (the tests see the route taken): one per weight and op call.
    RECORD_FUNCTION("rnnext::bf16_pack", std::vector<c10::IValue>());
    if (group_rows < 0) group_rows = w.size(0);
    if (n < 0) n = group_rows;
    TORCH_INTERNAL_ASSERT(groups * group_rows == w.size(0) && row0 >= 0 && n >= 0 && row0 + n <= group_rows);
    n_ = groups * n;
    k_ = w.size(1);
    packed_ = pooled_empty({packed_gemm::packed_size_bf16(n_, k_)}, w.options());
    const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr()) + row0 * k_;
    packed_gemm::pack_bf16(src, n_, k_, k_, reinterpret_cast<uint16_t*>(packed_.data_ptr()), n, group_rows * k_);
  }

  // C[rows, n] = bias (every row; or none: nullptr) + A[rows, k] @ W^T, A bfloat16.
  void multiply_bias(int64_t rows, const at::BFloat16* a, int64_t lda, const float* bias, float* c,
                     int64_t ldc) const {
    packed_gemm::multiply_bf16(rows, n_, k_, reinterpret_cast<const uint16_t*>(a), lda,
                               reinterpret_cast<const uint16_t*>(packed_.data_ptr()), bias, c, ldc);
  }

 private:
  int64_t n_ = 0, k_ = 0;
  at::Tensor packed_;
};

}  // namespace cpu
}  // namespace rnnext

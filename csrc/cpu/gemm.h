// GEMM routes for the CPU time loops.
//
// Per step the loops multiply small row blocks by a weight, so what a GEMM call costs besides
// its arithmetic matters: a call through the ATen dispatcher (at::mm_out on narrowed views)
// costs several microseconds, more than the whole arithmetic of a [1, 64] x [64, 256] step.
//
//  * gemm(): row-major C = op(A) op(B) (+ C) on raw pointers, straight into the BLAS that
//    torch itself links (sgemm_/dgemm_, looked up once at run time in libtorch_cpu and its
//    dependencies). Where this torch build exports no such symbol, or a size needs more
//    than 32 bits, it falls back to at::mm_out/addmm_ on views of the same memory.
//  * StepWeight: x @ W^T for a weight used at every time step (W_hh, W_ih slices forward,
//    W_hh^T backward) or every chunk of steps, prepared once per op call: float32 packed for
//    our AVX-512 or AVX2 kernel (packed_gemm.h) at up to 4096 / 256 rows per call, or into
//    MKL's panel layout (cblas_sgemm_pack) beyond; transposed for small_gemm_nn at a few
//    rows. A weight used once or twice (a *Cell call, one step of a layer) is not prepared:
//    our few-row kernels read it as it is (small_gemm_nt) or, for W^T, its storage
//    (small_gemm_nn), up to the rows measured faster than the BLAS (unpacked_nn_rows);
//    else plain BLAS.
//  * OneDnnMatmul: a @ b through oneDNN's matmul primitive, each operand read as it is
//    (no transposed copy, no reorder), for backward's one-shot products of float32 layers
//    (grad_x, and the weight gradients: TransposedProduct) on CPUs where oneDNN takes
//    float32 matmuls (AVX-512).
//  * OneDnnLinear: x @ W^T through oneDNN (torch's mkldnn::_linear_pointwise) with W
//    prepacked once per op call, for grad_x where OneDnnMatmul does not route (AVX2 CPUs);
//    each call costs ~15 us, so only large float32 products take this route.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <dlfcn.h>

#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>
#include <optional>

#include "options.h"
#include "packed_gemm.h"
#include "scratch.h"

// Loops that should run at SIMD width are compiled for AVX-512, for AVX2 and for baseline
// x86-64; the loader picks the best the CPU has (GCC function multiversioning), so one build
// runs everywhere and still uses the widest SIMD where it exists.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define RNNEXT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RNNEXT_SIMD_CLONES
#endif
#if defined(__GNUC__)
#define RNNEXT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RNNEXT_ALWAYS_INLINE inline
#endif

namespace rnnext {
namespace cpu {

extern "C" {
typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
typedef void (*dgemm_fn)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*, const int*);
}

// A symbol of libtorch_cpu or of the libraries it links (the BLAS torch itself uses), or
// nullptr. Looked up from libtorch_cpu's own handle (found through the address of one of its
// functions), which searches that library and its dependencies only: another BLAS loaded
// into the process with global symbols (an ILP64 build, a threaded OpenBLAS, an LD_PRELOAD)
// is never picked by accident. Where the lookup fails, callers take the ATen route.
inline void* torch_cpu_symbol(const char* name) {
  static void* torch_cpu = [] {
    Dl_info info{};
    void* handle = nullptr;
    if (dladdr(reinterpret_cast<void*>(&at::_ops::mm::call), &info) != 0 && info.dli_fname != nullptr) {
      handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    }
    return handle;
  }();
  return torch_cpu ? dlsym(torch_cpu, name) : nullptr;
}

inline sgemm_fn blas_sgemm() {
  static sgemm_fn fn = reinterpret_cast<sgemm_fn>(torch_cpu_symbol("sgemm_"));
  return fn;
}
inline dgemm_fn blas_dgemm() {
  static dgemm_fn fn = reinterpret_cast<dgemm_fn>(torch_cpu_symbol("dgemm_"));
  return fn;
}

// Fortran BLAS integer arguments, passed by pointer: each value is stored in 64 bits and
// passed as int*. On a little-endian CPU an LP64 BLAS reads the low 32 bits, an ILP64 one all
// 64, and both read the same value (callers keep every value below 2^31).
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the BLAS integer arguments assume little endian");
struct BlasInt {
  int64_t value;
  explicit BlasInt(int64_t v) : value(v) {}
  const int* ptr() const { return reinterpret_cast<const int*>(&value); }
};

// memcpy of `count` values; nothing for none (the pointers of an empty tensor may be null,
// and memcpy from or to null is undefined even for 0 bytes).
template <typename T>
inline void copy_values(T* dst, const T* src, int64_t count) {
  if (count > 0) std::memcpy(dst, src, sizeof(T) * count);
}

// out [cols, rows] = in [rows, cols]^T, in's rows ld apart, out contiguous (OneDnnLinear's
// W^T). Tiles of 16 x 16 (both sides in L1), bands of 16 rows split across threads: at
// [3200, 4096] float32 on two Zen 4 threads ~13 ms, against 44 ms for ATen's copy of a
// transposed view.
template <typename T>
void transpose_into(const T* in, int64_t rows, int64_t cols, int64_t ld, T* out) {
  constexpr int64_t kTile = 16;
  at::parallel_for(0, (rows + kTile - 1) / kTile, 1, [&](int64_t band0, int64_t band1) {
    for (int64_t band = band0; band < band1; ++band) {
      const int64_t r0 = band * kTile, r1 = std::min(rows, r0 + kTile);
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
        const int64_t c1 = std::min(cols, c0 + kTile);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t r = r0; r < r1; ++r) out[c * rows + r] = in[r * ld + c];
        }
      }
    }
  });
}

// A new contiguous [cols, rows] tensor holding t^T, for a 2-D t whose rows are contiguous
// (pooled memory: an op's temporary, not for its outputs).
inline at::Tensor transposed(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1), "rnnext: transposed() takes rows that are contiguous");
  at::Tensor out = pooled_empty({t.size(1), t.size(0)}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "rnnext_transposed", [&] {
    transpose_into<scalar_t>(t.data_ptr<scalar_t>(), t.size(0), t.size(1), t.stride(0), out.data_ptr<scalar_t>());
  });
  return out;
}

template <typename T>
at::Tensor view_of(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Row-major C[m, n] = op(A) op(B) + (accumulate ? C : 0), op(X) = X^T when trans_x.
// A is [m, k] ([k, m] when trans_a) with leading dimension lda; likewise B and C.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
          int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(T) * n);
    }
    return;
  }
  // Sizes past 32 bits take the ATen route (64-bit sizes) instead of being narrowed.
  const bool fits_int = m < INT_MAX && n < INT_MAX && k < INT_MAX && lda < INT_MAX && ldb < INT_MAX && ldc < INT_MAX;
  // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const BlasInt M(n), N(m), K(k), LDA(ldb), LDB(lda), LDC(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (fits_int && blas_sgemm()) {
      const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
      blas_sgemm()(&tb, &ta, M.ptr(), N.ptr(), K.ptr(), &alpha, b, LDA.ptr(), a, LDB.ptr(), &beta, c, LDC.ptr());
      return;
    }
  } else {
    if (fits_int && blas_dgemm()) {
      const double alpha = 1., beta = accumulate ? 1. : 0.;
      blas_dgemm()(&tb, &ta, M.ptr(), N.ptr(), K.ptr(), &alpha, b, LDA.ptr(), a, LDB.ptr(), &beta, c, LDC.ptr());
      return;
    }
  }
  at::Tensor A = trans_a ? view_of(a, k, m, lda).t() : view_of(a, m, k, lda);
  at::Tensor B = trans_b ? view_of(b, n, k, ldb).t() : view_of(b, k, n, ldb);
  at::Tensor C = view_of(c, m, n, ldc);
  if (accumulate) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

// Rows up to which small_gemm_nn beats a BLAS call (measured: a [1, 64] x [64, 256] product
// costs a few microseconds through sgemm, mostly call overhead, and a fraction of one here).
constexpr int64_t kSmallGemmRows = 4;

// The few-row kernels below work on SIMD vectors of kBytes bytes (GCC vector extension), kept
// in registers: 64 where the CPU has AVX-512, 32 with AVX2, 16 otherwise (simd_bytes()). Each
// width is compiled for its instruction set (the *_avx512 / *_avx2 entry points); a vector
// wider than the instruction set's registers would be split and spilled (measured: a 64-byte
// build on AVX2 ran 4-20x slower than MKL).
// (Spelled per type and size: GCC ignores vector_size on a dependent type.)
template <typename T, int kBytes>
struct VecOf;
#define RNNEXT_VEC_OF(T, N)                       \
  template <>                                     \
  struct VecOf<T, N> {                            \
    typedef T type __attribute__((vector_size(N))); \
  };
RNNEXT_VEC_OF(float, 64)
RNNEXT_VEC_OF(float, 32)
RNNEXT_VEC_OF(float, 16)
RNNEXT_VEC_OF(float, 8)
RNNEXT_VEC_OF(double, 64)
RNNEXT_VEC_OF(double, 32)
RNNEXT_VEC_OF(double, 16)
#undef RNNEXT_VEC_OF
template <typename T, int kBytes>
using Vec = typename VecOf<T, kBytes>::type;

template <typename T, int kBytes>
RNNEXT_ALWAYS_INLINE Vec<T, kBytes> load_vec(const T* p) {
  Vec<T, kBytes> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int kBytes>
RNNEXT_ALWAYS_INLINE void store_vec(T* p, const Vec<T, kBytes>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// The sum of a vector's lanes in a fixed tree: halves added lane by lane until one is left.
template <typename T, int kBytes>
RNNEXT_ALWAYS_INLINE T lane_sum(const Vec<T, kBytes>& v) {
  if constexpr (kBytes == 2 * sizeof(T)) {
    T pair[2];
    std::memcpy(pair, &v, sizeof(pair));
    return pair[0] + pair[1];
  } else {
    Vec<T, kBytes / 2> lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return lane_sum<T, kBytes / 2>(lo + hi);
  }
}

// The vector width of the few-row kernels on this CPU (see VecOf).
inline int simd_bytes() {
  return packed_gemm::cpu_supports(packed_gemm::Kernel::kAvx512) ? 64
         : packed_gemm::cpu_supports(packed_gemm::Kernel::kAvx2) ? 32
                                                                  : 16;
}

// Row-major C[m, n] = A[m, k] @ B[k, n] (+ C when accumulate), for a few rows: a tile of
// kRows rows by kVecs vectors of columns is accumulated in registers over all k (per p, one
// row of B's slice times each row's a[p]), then stored once; each row of B is read once per
// kRows rows of A. Every element is summed over p in order: deterministic. A's element
// (i, p) is a[i * lda + p * a_col]: a_col = 1 for A as stored; for a weight gradient
// D^T @ X over a few rows p of D [k, m], lda = 1 and a_col = D's leading dimension (each a
// scalar broadcast to a vector, so the stride costs nothing).
template <typename T, int kBytes, int kRows, int kVecs>
RNNEXT_ALWAYS_INLINE void small_gemm_nn_tile(int64_t k, const T* __restrict__ a, int64_t lda,
                                             int64_t a_col, const T* __restrict__ b, int64_t ldb, bool accumulate,
                                             T* __restrict__ c, int64_t ldc) {
  using V = Vec<T, kBytes>;
  constexpr int kLanes = kBytes / sizeof(T);
  V acc[kRows][kVecs];
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVecs; ++v) acc[i][v] = accumulate ? load_vec<T, kBytes>(c + i * ldc + v * kLanes) : V{};
  }
  for (int64_t p = 0; p < k; ++p) {
    for (int v = 0; v < kVecs; ++v) {
      const V bv = load_vec<T, kBytes>(b + p * ldb + v * kLanes);
      for (int i = 0; i < kRows; ++i) acc[i][v] += a[i * lda + p * a_col] * bv;
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVecs; ++v) store_vec<T, kBytes>(c + i * ldc + v * kLanes, acc[i][v]);
  }
}

// The same for one element (the columns past the last whole vector).
template <typename T>
RNNEXT_ALWAYS_INLINE void small_gemm_nn_element(int64_t k, const T* __restrict__ a, int64_t a_col,
                                                const T* __restrict__ b, int64_t ldb, bool accumulate,
                                                T* __restrict__ c) {
  T acc = accumulate ? *c : T(0);
  for (int64_t p = 0; p < k; ++p) acc += a[p * a_col] * b[p * ldb];
  *c = acc;
}

// Columns [j0, j1) of rows [0, kRows) of small_gemm_nn (below).
template <typename T, int kBytes, int kRows>
RNNEXT_ALWAYS_INLINE void small_gemm_nn_rows(int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda,
                                             int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c,
                                             int64_t ldc) {
  // Enough independent sums in flight to hide the FMA latency (4 or more vectors a tile),
  // and no more than 8, which leave registers for the loads on every instruction set.
  constexpr int kLanes = kBytes / sizeof(T), kVecs = kRows <= 2 ? 4 : 2;
  int64_t j = j0;
  for (; j + kVecs * kLanes <= j1; j += kVecs * kLanes) {
    small_gemm_nn_tile<T, kBytes, kRows, kVecs>(k, a, lda, a_col, b + j, ldb, accumulate, c + j, ldc);
  }
  for (; j + kLanes <= j1; j += kLanes) {
    small_gemm_nn_tile<T, kBytes, kRows, 1>(k, a, lda, a_col, b + j, ldb, accumulate, c + j, ldc);
  }
  for (; j < j1; ++j) {
    for (int i = 0; i < kRows; ++i) small_gemm_nn_element<T>(k, a + i * lda, a_col, b + j, ldb, accumulate, c + i * ldc + j);
  }
}

// Columns [j0, j1) of small_gemm_nn: up to 4 rows per pass over B.
template <typename T, int kBytes>
RNNEXT_ALWAYS_INLINE void small_gemm_nn_cols(int64_t m, int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda,
                                             int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c,
                                             int64_t ldc) {
  for (int64_t i = 0; i < m; i += 4) {
    const T* ai = a + i * lda;
    T* ci = c + i * ldc;
    switch (std::min<int64_t>(4, m - i)) {
      case 4: small_gemm_nn_rows<T, kBytes, 4>(j0, j1, k, ai, lda, a_col, b, ldb, accumulate, ci, ldc); break;
      case 3: small_gemm_nn_rows<T, kBytes, 3>(j0, j1, k, ai, lda, a_col, b, ldb, accumulate, ci, ldc); break;
      case 2: small_gemm_nn_rows<T, kBytes, 2>(j0, j1, k, ai, lda, a_col, b, ldb, accumulate, ci, ldc); break;
      default: small_gemm_nn_rows<T, kBytes, 1>(j0, j1, k, ai, lda, a_col, b, ldb, accumulate, ci, ldc); break;
    }
  }
}

// Row-major C[m, n] = A[m, k] @ W^T (+ C when accumulate) for a few rows, with W [n, k] read
// in its own layout (rows contiguous, leading dimension ldw): each element is the dot product
// of a row of A with a row of W. A weight used once or twice (a *Cell call, one decoder step)
// is then neither transposed nor packed, and the product does not go to the BLAS, whose
// generic sgemv/dgemv (what MKL runs on AMD CPUs) took 20 us of a 55 us GRU step at B=1,
// H=256. A tile of kRows rows of A by kW rows of W: kRows x kW dot products, each summed in
// one vector of partial sums (each row of A and of W is loaded once per vector step and used
// kW or kRows times), then lane_sum plus the k % kLanes tail in order: deterministic,
// whatever the thread split.
template <typename T, int kBytes, int kRows, int kW>
RNNEXT_ALWAYS_INLINE void small_gemm_nt_tile(int64_t k, const T* __restrict__ a, int64_t lda,
                                             const T* __restrict__ w, int64_t ldw, bool accumulate,
                                             T* __restrict__ c, int64_t ldc) {
  using V = Vec<T, kBytes>;
  constexpr int kLanes = kBytes / sizeof(T);
  V acc[kRows][kW] = {};
  int64_t p = 0;
  for (; p + kLanes <= k; p += kLanes) {
    V wv[kW];
    for (int r = 0; r < kW; ++r) wv[r] = load_vec<T, kBytes>(w + r * ldw + p);
    for (int i = 0; i < kRows; ++i) {
      const V av = load_vec<T, kBytes>(a + i * lda + p);
      for (int r = 0; r < kW; ++r) acc[i][r] += av * wv[r];
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int r = 0; r < kW; ++r) {
      T tail = 0;
      for (int64_t q = p; q < k; ++q) tail += a[i * lda + q] * w[r * ldw + q];
      const T dot = lane_sum<T, kBytes>(acc[i][r]) + tail;
      T& out = c[i * ldc + r];
      out = accumulate ? out + dot : dot;
    }
  }
}

// Columns [j0, j1) of rows [0, kRows) of small_gemm_nt: W's rows 4 at a time (the group
// few_rows_product keeps whole), then one at a time.
template <typename T, int kBytes, int kRows>
RNNEXT_ALWAYS_INLINE void small_gemm_nt_rows(int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda, const T* w,
                                             int64_t ldw, bool accumulate, T* c, int64_t ldc) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    small_gemm_nt_tile<T, kBytes, kRows, 4>(k, a, lda, w + j * ldw, ldw, accumulate, c + j, ldc);
  }
  for (; j < j1; ++j) small_gemm_nt_tile<T, kBytes, kRows, 1>(k, a, lda, w + j * ldw, ldw, accumulate, c + j, ldc);
}

// Columns [j0, j1) of small_gemm_nt: up to 4 rows of A per pass over W's rows with AVX-512's
// 32 registers (16 sums), 2 with 16 registers (8 sums).
template <typename T, int kBytes>
RNNEXT_ALWAYS_INLINE void small_gemm_nt_cols(int64_t m, int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda,
                                             const T* w, int64_t ldw, bool accumulate, T* c, int64_t ldc) {
  constexpr int64_t kMaxRows = kBytes == 64 ? 4 : 2;
  for (int64_t i = 0; i < m; i += kMaxRows) {
    const T* ai = a + i * lda;
    T* ci = c + i * ldc;
    switch (std::min<int64_t>(kMaxRows, m - i)) {
      case 4: small_gemm_nt_rows<T, kBytes, 4>(j0, j1, k, ai, lda, w, ldw, accumulate, ci, ldc); break;
      case 3: small_gemm_nt_rows<T, kBytes, 3>(j0, j1, k, ai, lda, w, ldw, accumulate, ci, ldc); break;
      case 2: small_gemm_nt_rows<T, kBytes, 2>(j0, j1, k, ai, lda, w, ldw, accumulate, ci, ldc); break;
      default: small_gemm_nt_rows<T, kBytes, 1>(j0, j1, k, ai, lda, w, ldw, accumulate, ci, ldc); break;
    }
  }
}

// Both kernels' columns [j0, j1) compiled once per instruction set: kNt selects small_gemm_nt
// (B is W [n, k]; A's rows contiguous, a_col = 1) over small_gemm_nn (B is [k, n]).
template <typename T, int kBytes, bool kNt>
RNNEXT_ALWAYS_INLINE void few_rows_cols(int64_t m, int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda,
                                        int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  if constexpr (kNt) {
    small_gemm_nt_cols<T, kBytes>(m, j0, j1, k, a, lda, b, ldb, accumulate, c, ldc);
  } else {
    small_gemm_nn_cols<T, kBytes>(m, j0, j1, k, a, lda, a_col, b, ldb, accumulate, c, ldc);
  }
}

#if RNNEXT_HAVE_PACKED_GEMM
template <typename T, bool kNt>
RNNEXT_AVX512 void few_rows_cols_avx512(int64_t m, int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda,
                                        int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  few_rows_cols<T, 64, kNt>(m, j0, j1, k, a, lda, a_col, b, ldb, accumulate, c, ldc);
}
template <typename T, bool kNt>
RNNEXT_AVX2 void few_rows_cols_avx2(int64_t m, int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda,
                                    int64_t a_col, const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  few_rows_cols<T, 32, kNt>(m, j0, j1, k, a, lda, a_col, b, ldb, accumulate, c, ldc);
}
#endif
template <typename T, bool kNt>
void few_rows_cols_sse(int64_t m, int64_t j0, int64_t j1, int64_t k, const T* a, int64_t lda, int64_t a_col,
                       const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  few_rows_cols<T, 16, kNt>(m, j0, j1, k, a, lda, a_col, b, ldb, accumulate, c, ldc);
}

// Work over [0, extent) as run(i0, i1), each unit costing unit_work multiply-adds: on the
// calling thread, or split across threads in whole groups of `group` units when it is worth
// waking them for (kMinThreadedWork multiply-adds per task: measured, a [1, 256] x [256, 768]
// product takes ~12 us on one Zen 4 thread and ~7 us on two). Each output element's sum does
// not depend on the split, so the result is the same on any number of threads.
constexpr int64_t kMinThreadedWork = int64_t(1) << 16;

template <class F>
void split_range(int64_t extent, int64_t group, int64_t unit_work, const F& run) {
  if (at::in_parallel_region() || extent * unit_work < 2 * kMinThreadedWork) {
    run(0, extent);
    return;
  }
  const int64_t groups = (extent + group - 1) / group;
  const int64_t grain = std::max<int64_t>(1, kMinThreadedWork / std::max<int64_t>(1, group * unit_work));
  at::parallel_for(0, groups, grain,
                   [&](int64_t g0, int64_t g1) { run(group * g0, std::min(extent, group * g1)); });
}

// One of the few-row products at vector width `bytes` (0: simd_bytes(); the tests name one).
// A product of a few rows is split across threads by columns: whole groups of 4 of W's rows
// (small_gemm_nt) or of a tile's 4 widest vectors. One of many rows (small_gemm_tn: a weight
// gradient [G*H, I]) is split by groups of 4 rows, so that each thread writes whole rows of C
// (measured on Zen 4: split by columns, a [1024, 256] gradient took 2.5x longer on two threads
// than on one).
template <typename T, bool kNt>
void few_rows_product(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, int64_t a_col, const T* b,
                      int64_t ldb, bool accumulate, T* c, int64_t ldc, int bytes, bool split_rows = false) {
  if (bytes == 0) bytes = simd_bytes();
  TORCH_CHECK(bytes == 16 || (bytes <= simd_bytes() && (bytes == 32 || bytes == 64)), "rnnext: ", bytes,
              "-byte vectors are not available on this CPU");
  auto cols = &few_rows_cols_sse<T, kNt>;
#if RNNEXT_HAVE_PACKED_GEMM
  if (bytes == 64) cols = &few_rows_cols_avx512<T, kNt>;
  if (bytes == 32) cols = &few_rows_cols_avx2<T, kNt>;
#endif
  if (split_rows) {
    split_range(m, 4, n * k, [&](int64_t i0, int64_t i1) {
      cols(i1 - i0, 0, n, k, a + i0 * lda, lda, a_col, b, ldb, accumulate, c + i0 * ldc, ldc);
    });
  } else {
    const int64_t group = kNt ? 4 : 256 / static_cast<int64_t>(sizeof(T));
    split_range(n, group, m * k, [&](int64_t j0, int64_t j1) {
      cols(m, j0, j1, k, a, lda, a_col, b, ldb, accumulate, c, ldc);
    });
  }
}

// Row-major C[m, n] = A[m, k] @ B[k, n] (+ C), B's rows contiguous, for a few rows.
template <typename T>
void small_gemm_nn(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                   bool accumulate, T* c, int64_t ldc, int bytes = 0) {
  few_rows_product<T, false>(m, n, k, a, lda, 1, b, ldb, accumulate, c, ldc, bytes);
}

// Row-major C[m, n] = A[m, k] @ W^T (+ C), W [n, k] with rows contiguous, for a few rows.
template <typename T>
void small_gemm_nt(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* w, int64_t ldw,
                   bool accumulate, T* c, int64_t ldc, int bytes = 0) {
  few_rows_product<T, true>(m, n, k, a, lda, 1, w, ldw, accumulate, c, ldc, bytes);
}

// Row-major C[m, n] = D^T @ X (+ C) over a few rows k of D [k, m] and X [k, n] (rows
// contiguous, leading dimensions ldd and ldx): a weight gradient of a *Cell call or a one-step
// layer, as small_gemm_nn with A = D^T read in D's storage, threads over rows of C.
template <typename T>
void small_gemm_tn(int64_t m, int64_t n, int64_t k, const T* d, int64_t ldd, const T* x, int64_t ldx,
                   bool accumulate, T* c, int64_t ldc, int bytes = 0) {
  few_rows_product<T, false>(m, n, k, d, 1, ldd, x, ldx, accumulate, c, ldc, bytes, /*split_rows=*/true);
}

// Up to how many rows a weight used once or twice (not packed) is multiplied by our few-row
// kernels rather than the BLAS, per vector width. Measured on Zen 4 (2 threads, MKL through
// torch 2.13), products of [rows, k] by [k, n] for (n, k) from (256, 256) to (1536, 512), each
// width's build run there (MKL's own kernels the same in all):
//  * W's storage as [k, n] (small_gemm_nn: the backward's dh_prev = d_gh @ W_hh and grad_x =
//    d_gi @ W_ih): 64 bytes 1.1-2x faster than MKL up to 32 rows in float32 and up to 16 in
//    float64 (0.9x at 32); 32 bytes 1.2-1.4x at 16 rows in float32, 1.4-1.6x at 4 rows in
//    float64 but 0.8-1.0x at 16; 16 bytes 1.2-1.6x at 1 row, 0.7-1.2x at 4.
//  * W as [n, k] (small_gemm_nt, the forward's x @ W^T, whose dot products each end in a
//    lane sum): 64 bytes 1.2-2x up to 8 rows, 0.85-1.4x at 16 (a gain from k = 512 on) and
//    0.8-1.3x at 32; 32 bytes 1.2-2x at 4 rows, 0.9-1.0x at 16; 16 bytes 1.3-1.7x at 1 row.
template <typename T>
inline int64_t unpacked_nn_rows() {
  switch (simd_bytes()) {
    case 64: return sizeof(T) == 4 ? 32 : 16;
    case 32: return sizeof(T) == 4 ? 16 : 4;
    default: return 1;
  }
}

// Whether a weight gradient d^T @ x over `rows` rows, [m, n], is small_gemm_tn's rather than
// the BLAS's, per vector width. Measured on Zen 4 (2 threads), d [rows, m] and x [rows, n]
// for (m, n) from (64, 64) to (2048, 512), against at::mm (what weight_grads calls):
// 64 bytes 1.05-5x faster up to 32 rows in float32; in float64 1.3-4x up to 8 rows, and up to
// 32 for gradients of up to 2^18 elements (0.85-0.95x at 16-32 rows above); 32 bytes up to 8
// rows in float32 and 4 in float64 (0.93-4x); 16 bytes 0.8-4x up to 2 rows in float32 and 1
// in float64.
template <typename T>
inline bool unpacked_tn_route(int64_t rows, int64_t m, int64_t n) {
  switch (simd_bytes()) {
    case 64: return sizeof(T) == 4 ? rows <= 32 : rows <= 8 || (rows <= 32 && m * n <= (int64_t(1) << 18));
    case 32: return rows <= (sizeof(T) == 4 ? 8 : 4);
    default: return rows <= (sizeof(T) == 4 ? 2 : 1);
  }
}

inline bool unpacked_nt_route(int64_t rows, int64_t k) {
  switch (simd_bytes()) {
    case 64: return rows <= 8 || (rows <= 16 && k >= 512);
    case 32: return rows <= 4;
    default: return rows <= 1;
  }
}

// MKL's packed-GEMM interface (cblas_sgemm_pack / cblas_sgemm_compute), which torch's x86
// builds export: the weight is reordered into MKL's panel layout once, instead of being
// copied into it by every sgemm call (a third of a [32, 256] x [256, 1024] product's time).
namespace mkl_packed {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
typedef size_t (*get_size_fn)(int, int, int, int);
typedef void (*pack_fn)(int, int, int, int, int, int, float, const float*, int, float*);
typedef void (*compute_fn)(int, int, int, int, int, int, const float*, int, const float*, int, float, float*, int);
struct Api {
  get_size_fn get_size = nullptr;
  pack_fn pack = nullptr;
  compute_fn compute = nullptr;
  bool ok() const { return get_size && pack && compute; }
};
inline const Api& api() {
  static const Api a = [] {
    Api r;
    r.get_size = reinterpret_cast<get_size_fn>(torch_cpu_symbol("cblas_sgemm_pack_get_size"));
    r.pack = reinterpret_cast<pack_fn>(torch_cpu_symbol("cblas_sgemm_pack"));
    r.compute = reinterpret_cast<compute_fn>(torch_cpu_symbol("cblas_sgemm_compute"));
    return r;
  }();
  return a;
}
}  // namespace mkl_packed

// Rows [row0, row0 + n) of each of `groups` groups of group_rows rows of w, one group after
// the other (a unit block's rows of every gate of a gate-major weight or bias); w itself when
// that is all of it.
inline at::Tensor row_groups(const at::Tensor& w, int64_t groups, int64_t group_rows, int64_t row0, int64_t n) {
  if (row0 == 0 && n == group_rows) return w;
  std::vector<at::Tensor> parts;
  for (int64_t g = 0; g < groups; ++g) parts.push_back(w.narrow(0, g * group_rows + row0, n));
  return at::cat(parts, 0);
}

// C[rows, n] = A[rows, k] @ W^T (+ C) for one weight W [n, k] multiplied many times (once
// per time step, or once per chunk of steps). How is chosen once, at construction: for
// float32 with AVX-512 or AVX2, our packed GEMM (packed_gemm.h) for step-sized products
// (and, with AVX-512, chunk-sized ones: max_own_gemm_rows), MKL's packed GEMM for larger
// ones (MKL's own threading and blocking win there); small_gemm_nn on W^T for a few rows;
// otherwise the plain gemm(). A weight used for fewer than kMinUsesToPack products (a
// sequence of one or two steps: a *Cell call, a decoder step) is not packed or transposed at
// all: the copy would cost about what the products do.
template <typename T>
class StepWeight {
 public:
  // w [n, k], contiguous or a transposed view of a contiguous [k, n] (W_hh^T in backward),
  // which every route reads from its storage as it is, without a transposed copy. `uses`:
  // the time steps this weight serves (a product each, or a share of one per chunk).
  StepWeight(const at::Tensor& w, int64_t max_rows, int64_t uses = kMinUsesToPack)
      : n_(w.size(0)), k_(w.size(1)), stored_transposed_(!w.is_contiguous() && w.t().is_contiguous()) {
    const bool fits_int = max_rows < INT_MAX && n_ < INT_MAX && k_ < INT_MAX;
    const packed_gemm::Kernel own_kernel = options::own_gemm();
    if (uses < kMinUsesToPack) {
      w_ = stored_transposed_ ? w.t() : w.contiguous();
    } else if (takes_own_gemm(max_rows, uses)) {
      kernel_ = own_kernel;
      w_ = pooled_empty({packed_gemm::packed_size(n_, k_)}, w.options());
      packed_gemm::pack(reinterpret_cast<const float*>(w.data_ptr()), n_, k_, w.stride(0), w.stride(1),
                        reinterpret_cast<float*>(w_.data_ptr()));
      own_ = true;
    } else if (max_rows <= kSmallGemmRows) {
      w_ = w.t().contiguous();
      small_ = true;
    } else if (std::is_same_v<T, float> && fits_int && mkl_packed::api().ok() && options::mkl_packed()) {
      const auto& mkl = mkl_packed::api();
      const size_t bytes = mkl.get_size(mkl_packed::kBMatrix, static_cast<int>(max_rows), static_cast<int>(n_),
                                        static_cast<int>(k_));
      w_ = pooled_empty({static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))}, w.options());
      // op(B) = W^T [k, n]: the storage itself when W is a transposed view.
      const at::Tensor src = stored_transposed_ ? w.t() : w.contiguous();
      mkl.pack(mkl_packed::kRowMajor, mkl_packed::kBMatrix, stored_transposed_ ? mkl_packed::kNoTrans : mkl_packed::kTrans,
               static_cast<int>(max_rows), static_cast<int>(n_), static_cast<int>(k_), 1.f,
               reinterpret_cast<const float*>(src.data_ptr()), static_cast<int>(stored_transposed_ ? n_ : k_),
               reinterpret_cast<float*>(w_.data_ptr()));
      packed_ = true;
    } else {
      w_ = stored_transposed_ ? w.t() : w.contiguous();
    }
  }

  // Whether a weight of these uses and rows goes to our packed GEMM (see the constructor).
  static bool takes_own_gemm(int64_t max_rows, int64_t uses) {
    const packed_gemm::Kernel own_kernel = options::own_gemm();
    return uses >= kMinUsesToPack && std::is_same_v<T, float> && own_kernel != packed_gemm::Kernel::kNone &&
           max_rows <= max_own_gemm_rows(own_kernel);
  }

  // The weight row_groups(w, ...) [groups * n, k]: a unit block's rows of every gate of
  // W_hh. Packed straight from a contiguous w where our packed GEMM takes it (copying the rows
  // together first cost ~7 ms of an LSTM T=50, B=64, H=1024 forward's ~290), else from
  // row_groups' concatenation.
  static StepWeight of_row_groups(const at::Tensor& w, int64_t groups, int64_t group_rows, int64_t row0, int64_t n,
                                  int64_t max_rows, int64_t uses = kMinUsesToPack) {
    const bool part = !(row0 == 0 && n == group_rows);
    if (part && takes_own_gemm(max_rows, uses) && w.is_contiguous()) {
      return StepWeight(PackedRowGroups{}, w, groups, group_rows, row0, n);
    }
    return StepWeight(row_groups(w, groups, group_rows, row0, n), max_rows, uses);
  }

  // W^T for a contiguous w [k, n] (W_hh^T, W_hr^T in backward). Used fewer than
  // kMinUsesToPack times it is kept as it is without making the transposed view: three
  // t() calls (~0.2 us each) were a few percent of a *Cell backward.
  static StepWeight transpose_of(const at::Tensor& w, int64_t max_rows, int64_t uses = kMinUsesToPack) {
    if (uses >= kMinUsesToPack || !w.is_contiguous()) return StepWeight(w.t(), max_rows, uses);
    return StepWeight(AsItsTranspose{}, w);
  }

  void multiply(int64_t rows, const T* a, int64_t lda, bool accumulate, T* c, int64_t ldc) const {
    const T* w = w_.data_ptr<T>();
    if (own_) {
      if constexpr (std::is_same_v<T, float>) {
        packed_gemm::multiply(kernel_, rows, n_, k_, a, lda, w, accumulate, c, ldc, streaming_);
      }
    } else if (small_) {
      small_gemm_nn<T>(rows, n_, k_, a, lda, w, n_, accumulate, c, ldc);
    } else if (packed_) {
      // rows <= max_rows, and n, k were checked to fit an int at construction.
      TORCH_CHECK(lda < INT_MAX && ldc < INT_MAX, "rnnext: a row stride (", lda, ", ", ldc,
                  ") too large for MKL's packed GEMM");
      if constexpr (std::is_same_v<T, float>) {
        mkl_packed::api().compute(mkl_packed::kRowMajor, mkl_packed::kNoTrans, mkl_packed::kPacked,
                                  static_cast<int>(rows), static_cast<int>(n_), static_cast<int>(k_), a,
                                  static_cast<int>(lda), w, static_cast<int>(k_), accumulate ? 1.f : 0.f, c,
                                  static_cast<int>(ldc));
      }
    } else if (stored_transposed_ ? rows <= unpacked_nn_rows<T>() : unpacked_nt_route(rows, k_)) {
      // A weight used once or twice, as it is: see unpacked_nn_rows for the measured limits.
      if (stored_transposed_) {
        small_gemm_nn<T>(rows, n_, k_, a, lda, w, n_, accumulate, c, ldc);
      } else {
        small_gemm_nt<T>(rows, n_, k_, a, lda, w, k_, accumulate, c, ldc);
      }
    } else {
      gemm<T>(false, !stored_transposed_, rows, n_, k_, a, lda, w, stored_transposed_ ? n_ : k_, accumulate, c, ldc);
    }
  }

  // C[rows, n] = bias (every row) + A @ W^T, or A @ W^T without a bias: bias [n] or nullptr.
  // Our packed GEMM adds the bias as it stores each tile; the other routes start C from it.
  void multiply_bias(int64_t rows, const T* a, int64_t lda, const T* bias, T* c, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (own_) {
        packed_gemm::multiply(kernel_, rows, n_, k_, a, lda, w_.data_ptr<float>(), false, c, ldc, streaming_, bias);
        return;
      }
    }
    if (bias) {
      for (int64_t b = 0; b < rows; ++b) copy_values(c + b * ldc, bias, n_);
    }
    multiply(rows, a, lda, bias != nullptr, c, ldc);
  }

  // Marks the weight as read from memory rather than cache at every call (the caller knows
  // what else each step reads); only our packed GEMM acts on it.
  void set_streaming(bool on) { streaming_ = on; }

  // Products of more rows per call than this go to the BLAS: 256 for the AVX2 kernel; 4096
  // for the AVX-512 one, which keeps up with MKL (its Zen kernels, on Zen 4) at the
  // chunk-sized products of the input projection (one Zen 4 thread, GFLOP/s, ours / MKL:
  // [1024, 256] x [256, 1024] 113 / 94, [2048, 256] x [256, 768] 105 / 96, [4096, 1024] x
  // [1024, 1024] 91 / 93).
  static int64_t max_own_gemm_rows(packed_gemm::Kernel kernel) {
    return kernel == packed_gemm::Kernel::kAvx512 ? 4096 : 256;
  }

  // Fewer products than this take the weight as it is (see the class comment).
  static constexpr int64_t kMinUsesToPack = 3;

 private:
  // of_row_groups' packed weight (float32 only: our packed GEMM's).
  struct PackedRowGroups {};
  StepWeight(PackedRowGroups, const at::Tensor& w, int64_t groups, int64_t group_rows, int64_t row0, int64_t n)
      : n_(groups * n), k_(w.size(1)), stored_transposed_(false), kernel_(options::own_gemm()), own_(true) {
    w_ = pooled_empty({packed_gemm::packed_size(n_, k_)}, w.options());
    if constexpr (std::is_same_v<T, float>) {
      packed_gemm::pack(w.data_ptr<float>() + row0 * k_, n_, k_, k_, 1, w_.data_ptr<float>(), n, group_rows * k_);
    }
  }

  // The transpose of a contiguous w [k, n], used as it is (transpose_of).
  struct AsItsTranspose {};
  StepWeight(AsItsTranspose, const at::Tensor& w) : n_(w.size(1)), k_(w.size(0)), stored_transposed_(true), w_(w) {}

  int64_t n_, k_;
  bool stored_transposed_;
  at::Tensor w_;
  packed_gemm::Kernel kernel_ = packed_gemm::Kernel::kNone;
  bool own_ = false, small_ = false, packed_ = false, streaming_ = false;
};

// y = x @ W^T through oneDNN, W [n, k] prepacked at construction: grad_x's route where
// OneDnnMatmul does not take float32 (AVX2 CPUs). Usable only when available() (float32, a
// torch build with the mkldnn ops); callers keep the BLAS route.
class OneDnnLinear {
 public:
  // Products of at least kMinWork multiply-adds per call go to oneDNN, where its speed pays
  // for its call cost; above kMaxWork (one-shot products of several GFLOP) the BLAS
  // measured faster on the AVX2 machines we bench.
  static constexpr int64_t kMinWork = int64_t(1) << 22;
  static constexpr int64_t kMaxWork = int64_t(1) << 32;

  // Fewer rows than this do not pay for the weight's reorder (a copy of W per call): a *Cell
  // training step (B = 32, H = 256) spent ~1 ms in it, three times torch.nn's whole step.
  static constexpr int64_t kMinRows = 512;

  // For products of `rows` rows (also oneDNN's batch hint for the reorder).
  OneDnnLinear(const at::Tensor& w, int64_t rows) {
    const int64_t work = rows * w.size(0) * w.size(1);
    if (w.scalar_type() != at::kFloat || !enabled() || rows < kMinRows || work < kMinWork || work > kMaxWork) {
      return;
    }
    static const auto reorder = c10::Dispatcher::singleton().findOp({"mkldnn::_reorder_linear_weight", ""});
    static const auto linear = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!reorder || !linear) return;
    linear_ = *linear;
    // W^T of a contiguous weight (grad_x's W_ih) by our tiled transpose, not ATen's copy.
    const bool stored_transposed = !w.is_contiguous() && w.t().is_contiguous();
    std::vector<c10::IValue> stack{stored_transposed ? transposed(w.t()) : w.contiguous(), c10::IValue(rows)};
    reorder->callBoxed(&stack);
    packed_ = stack[0].toTensor();
    ok_ = true;
  }

  bool available() const { return ok_; }

  // oneDNN is there (a torch build with it) and turned off neither by options::onednn
  // (RNNEXT_ONEDNN) nor by torch.backends.mkldnn.enabled.
  static bool enabled() {
    return at::hasMKLDNN() && options::onednn() && at::globalContext().userEnabledMkldnn();
  }

  // x [m, k] (rows contiguous) -> new [m, n] tensor.
  at::Tensor operator()(const at::Tensor& x) const {
    // _linear_pointwise(input, packed weight, bias, attr, scalars, algorithm)
    std::vector<c10::IValue> stack{x, packed_, c10::IValue(), c10::IValue(std::string("none")),
                                   c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue(std::string(""))};
    linear_->callBoxed(&stack);
    return stack[0].toTensor();
  }

 private:
  bool ok_ = false;
  at::Tensor packed_;
  std::optional<c10::OperatorHandle> linear_;
};

// a @ b [m, n] through oneDNN's matmul primitive: at::native::mkldnn_matmul, the function
// at::mm itself runs for bfloat16 (ATen/native/mkldnn/Matmul.cpp: result = beta * result +
// alpha * mat1 @ mat2). It is not in torch's installed headers, so it is looked up by its
// mangled name at run time (exported with this signature by torch 2.4.1, 2.13.0 and 2.14.1):
// a torch without it loses this route, not the extension. It reads an operand as it is when
// the operand is contiguous or the transpose of a contiguous tensor (copies others), so d^T
// of a contiguous d (the weight gradients' d^T @ in) needs no transposed copy, and a weight
// no reorder per call. Measured on Zen 4 (AVX-512, two threads) against at::mm (MKL, its Zen
// kernels): 1.03-1.18x from 2^24 multiply-adds (0.94-1.13x at 2^23, 0.86-1.07x at 2^22,
// where its ~10-20 us per call shows); 1.07-1.33x on the backward's products of large layers
// ([3200, 4096]^T x [3200, 1024] 135 vs 153 ms; [3200, 4096] x [4096, 1024] 130 vs 155 ms,
// and 144 ms by OneDnnLinear with its reorder of W^T).
// Only float32 on CPUs where torch's oneDNN takes float32 matmuls (AVX-512 BW/VL/DQ; it
// refuses them elsewhere, e.g. on AVX2-only CPUs, which keep at::mm and OneDnnLinear), and
// products of at least kMinWork multiply-adds, and only while oneDNN is on (RNNEXT_ONEDNN and
// torch.backends.mkldnn.enabled). A call that fails other than for memory (a torch build
// whose oneDNN refuses, or one capped below AVX-512 by ONEDNN_MAX_CPU_ISA) warns once, takes
// at::mm, and turns the route off for the process (the products then route as on AVX2 CPUs).
// Under torch.backends.mkldnn's reduced float32 matmul precision (bf16) oneDNN computes as
// at::mm then does, in that precision. Visible to the profiler as "rnnext::onednn_matmul".
class OneDnnMatmul {
 public:
  static constexpr int64_t kMinWork = int64_t(1) << 24;

  // a @ b takes this route; any_size: at any size (the tests' forced route).
  static bool route(const at::Tensor& a, const at::Tensor& b, bool any_size = false) {
    return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && cpu_takes_float32() &&
           OneDnnLinear::enabled() && function() != nullptr && !failed() &&
           (any_size || a.size(0) * a.size(1) * b.size(1) >= kMinWork);
  }

  // a [m, k], b [k, n] -> a new [m, n] tensor (route(a, b) checked by the caller).
  static at::Tensor multiply(const at::Tensor& a, const at::Tensor& b) {
    at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
    try {
      RECORD_FUNCTION("rnnext::onednn_matmul", std::vector<c10::IValue>());
      function()(a, b, out, /*beta=*/0.f, /*alpha=*/1.f);
    } catch (const c10::OutOfMemoryError&) {
      throw;  // at::mm would need the same memory
    } catch (const std::exception& e) {
      // c10::Error's what() carries a C++ backtrace: the warning gives its message only.
      const auto* error = dynamic_cast<const c10::Error*>(&e);
      TORCH_WARN_ONCE("rnnext: oneDNN's matmul failed (", error ? error->what_without_backtrace() : e.what(),
                      "); the backward goes without it from now on");
      failed() = true;
      return at::mm(a, b);
    }
    return out;
  }

 private:
  static bool cpu_takes_float32() {
#if defined(__x86_64__) && defined(__GNUC__)
    static const bool ok = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512dq");
    return ok;
#else
    return false;
#endif
  }
  static std::atomic<bool>& failed() {
    static std::atomic<bool> flag{false};
    return flag;
  }
  using Function = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);
  static Function function() {
    static const Function fn =
        reinterpret_cast<Function>(torch_cpu_symbol("_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
    return fn;
  }
};

// d^T @ in [m, n] for the weight gradients (weight_grads in ../layer_ops.h), d [N, m] and
// in [N, n] with contiguous rows: OneDnnMatmul where it routes, else at::mm.
class TransposedProduct {
 public:
  // any_size: oneDNN at any size (tests: rnnext::_step_gemm's "onednn_tn").
  explicit TransposedProduct(bool any_size = false) : any_size_(any_size) {}

  at::Tensor operator()(const at::Tensor& d, const at::Tensor& in) const {
    const at::Tensor d_t = d.t();
    return OneDnnMatmul::route(d_t, in, any_size_) ? OneDnnMatmul::multiply(d_t, in) : at::mm(d_t, in);
  }

 private:
  bool any_size_;
};

}  // namespace cpu
}  // namespace rnnext

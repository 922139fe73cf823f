// GRU on CUDA: the cell policy for layer_loop.cuh and the op registrations.
//
// Gates r, z, n (gate index 0..2); the workspace is GruTraits' (../workspace.h):
// [ r z n | gh_n ], gh_n = W_hn h_prev + b_hn, which r multiplies.
#include <torch/library.h>

#include "layer_loop.cuh"

namespace rnnext {
namespace cuda {
namespace {

struct GruCell : GruTraits {
  // n = tanh(gi_n + r * gh_n), h = (1 - z) * n + z * h_prev for unit j of row b.
  template <typename T>
  __device__ static void forward(const ForwardStep<T>& s, int64_t b, int64_t j) {
    using A = at::opmath_type<T>;
    const int64_t H = s.H;
    const A gh_n = s.hid(b, 2, j);
    const auto a = math::gru_forward<A>(s.in(b, 0, j), s.in(b, 1, j), s.in(b, 2, j), s.hid(b, 0, j), s.hid(b, 1, j),
                                        gh_n, A(s.h_prev[b * s.h_prev_ld + j]));
    s.h_out[b * s.h_out_ld + j] = T(a.h);
    if (s.ws) {
      T* w = s.ws + b * s.ws_ld + j;
      w[kR * H] = T(a.r);
      w[kZ * H] = T(a.z);
      w[kN * H] = T(a.n);
      w[kGhN * H] = T(gh_n);
    }
  }

  // Gate gradients of row b, input side and hidden side (they differ in n: d gh_n = r d gi_n),
  // and the direct z * dh part of dh_prev (the GEMM adds d_gh @ W_hh to it).
  template <typename T>
  __device__ static void backward(const BackwardStep<T>& s, int64_t b, int64_t j) {
    using A = at::opmath_type<T>;
    const int64_t H = s.H;
    const T* w = s.ws + b * s.ws_ld + j;
    const auto d = math::gru_backward<A>(s.dh(b, j), A(w[kR * H]), A(w[kZ * H]), A(w[kN * H]), A(w[kGhN * H]),
                                         A(s.h_prev[b * s.h_prev_ld + j]));
    T* d_gi = s.d_gi + b * 3 * H + j;
    T* d_gh = s.d_gh + b * 3 * H + j;
    d_gi[0 * H] = d_gh[0 * H] = T(d.d_r);
    d_gi[1 * H] = d_gh[1 * H] = T(d.d_z);
    d_gi[2 * H] = T(d.d_gi_n);
    d_gh[2 * H] = T(d.d_gh_n);
    s.dh_prev[b * s.dh_prev_ld + j] = T(d.dh_prev_direct);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CUDA, m) {
  m.impl("gru_layer_forward", &SingleStateOps<CudaLoop, GruCell>::forward);
  m.impl("gru_layer_backward", &SingleStateOps<CudaLoop, GruCell>::backward);
}

}  // namespace cuda
}  // namespace rnnext

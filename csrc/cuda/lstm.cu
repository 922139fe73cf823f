// LSTM on CUDA: the cell policy for layer_loop.cuh and the op registrations.
//
// Gates i, f, g, o (torch.nn's order, gate index 0..3); the workspace is LstmTraits'
// (../workspace.h): [ i f g o | c ], then r = o * tanh(c) with a projection. c_prev is the
// previous step's c (or c0), read from there in backward.
#include <torch/library.h>

#include "layer_loop.cuh"

namespace rnnext {
namespace cuda {
namespace {

struct LstmCell : LstmTraits {
  // c = f * c_prev + i * g, h = o * tanh(c) for unit j of row b; c in place.
  template <typename T>
  __device__ static void forward(const ForwardStep<T>& s, int64_t b, int64_t j) {
    using A = at::opmath_type<T>;
    const int64_t H = s.H;
    T* c = s.c_state + b * H + j;
    const auto a = math::lstm_forward<A>(s.in(b, 0, j) + s.hid(b, 0, j), s.in(b, 1, j) + s.hid(b, 1, j),
                                         s.in(b, 2, j) + s.hid(b, 2, j), s.in(b, 3, j) + s.hid(b, 3, j), A(*c));
    *c = T(a.c);
    s.h_out[b * s.h_out_ld + j] = T(a.h);
    if (s.ws) {
      T* w = s.ws + b * s.ws_ld + j;
      w[kI * H] = T(a.i);
      w[kF * H] = T(a.f);
      w[kG * H] = T(a.g);
      w[kO * H] = T(a.o);
      w[kC * H] = T(a.c);
    }
  }

  // Gate gradients [4H] of row b from dh and dc (in: of c_t, out: of c_prev).
  template <typename T>
  __device__ static void backward(const BackwardStep<T>& s, int64_t b, int64_t j) {
    using A = at::opmath_type<T>;
    const int64_t H = s.H;
    const T* w = s.ws + b * s.ws_ld + j;
    const A c_prev = b < s.carried ? A(s.ws_prev[b * s.ws_ld + kC * H + j]) : A(s.c0[b * H + j]);
    T* dc = s.dc_state + b * H + j;
    const auto d = math::lstm_backward<A>(s.dh(b, j), A(*dc), A(w[kI * H]), A(w[kF * H]), A(w[kG * H]),
                                          A(w[kO * H]), A(w[kC * H]), c_prev);
    T* d_gates = s.d_gi + b * 4 * H + j;
    d_gates[0 * H] = T(d.d_i);
    d_gates[1 * H] = T(d.d_f);
    d_gates[2 * H] = T(d.d_g);
    d_gates[3 * H] = T(d.d_o);
    *dc = T(d.d_c_prev);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CUDA, m) {
  m.impl("lstm_layer_forward", &LstmOps<CudaLoop, LstmCell>::forward);
  m.impl("lstm_layer_backward", &LstmOps<CudaLoop, LstmCell>::backward);
}

}  // namespace cuda
}  // namespace rnnext

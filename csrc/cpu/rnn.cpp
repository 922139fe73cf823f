// Elman RNN (tanh and ReLU) on the CPU: the cell policy for layer_loop.h and the op
// registrations. The workspace is empty: the derivative comes from h_t = y, and h_prev is
// the previous output.
// b_hh is folded into the input projection.
#include <torch/library.h>

#include "../cell_math.h"
#include "layer_loop.h"

namespace rnnext {
namespace cpu {
namespace {

template <bool kRelu>
struct RnnCell : RnnTraits {

  // One batch row over a block of n hidden units: pre-activations gi + gh [n] -> h [n].
  // restrict lets the j loop vectorise.
  template <typename T>
  RNNEXT_ALWAYS_INLINE static void forward_row(int64_t n, const T* __restrict__ gi, const T* __restrict__ gh,
                                               T* __restrict__ h) {
    for (int64_t j = 0; j < n; ++j) {
      h[j] = kRelu ? math::rnn_relu_forward<T>(gi[j] + gh[j]) : math::rnn_tanh_forward<T>(gi[j] + gh[j]);
    }
  }

  template <typename T>
  RNNEXT_SIMD_CLONES static void forward_rows(const ForwardStep<T>& s, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      forward_row<T>(s.n, s.gi + b * s.gi_ld, s.gh + b * s.gh_ld, s.h_out + b * s.h_out_ld);
    }
  }

  // One batch row: dh [H] and the step's output h [H] -> d pre-activation [H].
  template <typename T>
  RNNEXT_ALWAYS_INLINE static void backward_row(int64_t H, const T* __restrict__ dh, const T* __restrict__ h,
                                                T* __restrict__ d_pre) {
    for (int64_t j = 0; j < H; ++j) {
      d_pre[j] = kRelu ? math::rnn_relu_backward<T>(dh[j], h[j]) : math::rnn_tanh_backward<T>(dh[j], h[j]);
    }
  }

  template <typename T>
  RNNEXT_SIMD_CLONES static void backward_rows(const BackwardStep<T>& s, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      backward_row<T>(s.H, s.dh + b * s.dh_ld, s.y + b * s.y_ld, s.d_gi + b * s.d_gi_ld);
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  m.impl("rnn_tanh_layer_forward", &SingleStateOps<CpuLoop, RnnCell<false>>::forward);
  m.impl("rnn_tanh_layer_backward", &SingleStateOps<CpuLoop, RnnCell<false>>::backward);
  m.impl("rnn_relu_layer_forward", &SingleStateOps<CpuLoop, RnnCell<true>>::forward);
  m.impl("rnn_relu_layer_backward", &SingleStateOps<CpuLoop, RnnCell<true>>::backward);
}

}  // namespace cpu
}  // namespace rnnext

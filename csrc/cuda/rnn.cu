// Elman RNN (tanh and ReLU) on CUDA: the cell policy for layer_loop.cuh and the op
// registrations. No workspace: the derivative comes from h_t, the output row itself.
#include <torch/library.h>

#include "layer_loop.cuh"

namespace rnnext {
namespace cuda {
namespace {

template <bool kRelu>
struct RnnCell : RnnTraits {
  // h = tanh(pre) or relu(pre), pre = gi + b_ih + gh + b_hh, for unit j of row b.
  template <typename T>
  __device__ static void forward(const ForwardStep<T>& s, int64_t b, int64_t j) {
    using A = at::opmath_type<T>;
    const A pre = s.in(b, 0, j) + s.hid(b, 0, j);
    s.h_out[b * s.h_out_ld + j] = T(kRelu ? math::rnn_relu_forward<A>(pre) : math::rnn_tanh_forward<A>(pre));
  }

  // d pre = dh * act'(pre), from h_t = y.
  template <typename T>
  __device__ static void backward(const BackwardStep<T>& s, int64_t b, int64_t j) {
    using A = at::opmath_type<T>;
    const A h = A(s.y[b * s.y_ld + j]);
    const A dh = s.dh(b, j);
    s.d_gi[b * s.H + j] = T(kRelu ? math::rnn_relu_backward<A>(dh, h) : math::rnn_tanh_backward<A>(dh, h));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CUDA, m) {
  m.impl("rnn_tanh_layer_forward", &SingleStateOps<CudaLoop, RnnCell<false>>::forward);
  m.impl("rnn_tanh_layer_backward", &SingleStateOps<CudaLoop, RnnCell<false>>::backward);
  m.impl("rnn_relu_layer_forward", &SingleStateOps<CudaLoop, RnnCell<true>>::forward);
  m.impl("rnn_relu_layer_backward", &SingleStateOps<CudaLoop, RnnCell<true>>::backward);
}

}  // namespace cuda
}  // namespace rnnext

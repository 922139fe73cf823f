// LSTM on the CPU: the cell policy for layer_loop.h and the op registrations.
//
// Workspace columns after h_prev: [ c_prev (H) | i f g o (4H) | c (H) ], then r (H) with a
// projection. b_hh is folded into the input projection (gi = x W_ih^T + b_ih + b_hh).
#include <torch/library.h>

#include "../cell_math.h"
#include "layer_loop.h"

namespace rnnext {
namespace cpu {
namespace {

struct LstmCell {
  static constexpr int64_t kGates = 4;
  static constexpr bool kHasCellState = true;
  static constexpr bool kRecurrentBias = false;
  static constexpr bool kSeparateHiddenGrad = false;
  static constexpr bool kDirectHiddenGrad = false;
  static int64_t cell_ws_cols(int64_t H) { return 6 * H; }

  template <typename T>
  static void forward_rows(const ForwardStep<T>& s, int64_t b0, int64_t b1) {
    const int64_t H = s.H;
    for (int64_t b = b0; b < b1; ++b) {
      const T* gi = s.gi + b * s.gi_ld;
      const T* gh = s.gh + b * s.gh_ld;
      T* c_prev_saved = s.ws + b * s.ws_ld + s.Hout;
      T* gates = c_prev_saved + H;
      T* c_saved = gates + 4 * H;
      T* c = s.c_state + b * H;
      T* h = s.h_out + b * s.h_out_ld;
      for (int64_t j = 0; j < H; ++j) {
        const auto a = math::lstm_forward<T>(gi[j] + gh[j], gi[H + j] + gh[H + j], gi[2 * H + j] + gh[2 * H + j],
                                             gi[3 * H + j] + gh[3 * H + j], c[j]);
        c_prev_saved[j] = c[j];
        gates[j] = a.i;
        gates[H + j] = a.f;
        gates[2 * H + j] = a.g;
        gates[3 * H + j] = a.o;
        c_saved[j] = a.c;
        c[j] = a.c;
        h[j] = a.h;
      }
    }
  }

  template <typename T>
  static void backward_rows(const BackwardStep<T>& s, int64_t b0, int64_t b1) {
    const int64_t H = s.H;
    for (int64_t b = b0; b < b1; ++b) {
      const T* dh = s.dh + b * s.dh_ld;
      const T* c_prev = s.ws + b * s.ws_ld + s.Hout;
      const T* gates = c_prev + H;
      const T* c = gates + 4 * H;
      T* dc = s.dc_state + b * H;
      T* d_gates = s.d_gi + b * s.d_gi_ld;
      for (int64_t j = 0; j < H; ++j) {
        const auto d = math::lstm_backward<T>(dh[j], dc[j], gates[j], gates[H + j], gates[2 * H + j],
                                              gates[3 * H + j], c[j], c_prev[j]);
        d_gates[j] = d.d_i;
        d_gates[H + j] = d.d_f;
        d_gates[2 * H + j] = d.d_g;
        d_gates[3 * H + j] = d.d_o;
        dc[j] = d.d_c_prev;
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse) {
  return layer_forward<LstmCell>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& w_hr,
                    const OptTensor& batch_sizes, bool reverse, bool has_bias, const at::Tensor& y,
                    const at::Tensor& workspace) {
  auto g = layer_backward<LstmCell>(grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, batch_sizes, reverse, has_bias,
                                    y, workspace);
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward);
  m.impl("lstm_layer_backward", &lstm_layer_backward);
}

}  // namespace cpu
}  // namespace rnnext

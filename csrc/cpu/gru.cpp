// GRU on the CPU: the cell policy for layer_loop.h and the op registrations.
//
// Workspace columns after h_prev: [ r z n (3H) | gh_n (H) ]. b_hh stays in the recurrent GEMM
// (gh = h_prev W_hh^T + b_hh) because r multiplies gh_n = W_hn h_prev + b_hn.
#include <torch/library.h>

#include "../cell_math.h"
#include "layer_loop.h"

namespace rnnext {
namespace cpu {
namespace {

struct GruCell {
  static constexpr int64_t kGates = 3;
  static constexpr bool kHasCellState = false;
  static constexpr bool kRecurrentBias = true;
  static constexpr bool kSeparateHiddenGrad = true;
  static constexpr bool kDirectHiddenGrad = true;
  static int64_t cell_ws_cols(int64_t H) { return 4 * H; }

  template <typename T>
  static void forward_rows(const ForwardStep<T>& s, int64_t b0, int64_t b1) {
    const int64_t H = s.H;
    for (int64_t b = b0; b < b1; ++b) {
      const T* gi = s.gi + b * s.gi_ld;
      const T* gh = s.gh + b * s.gh_ld;
      const T* h_prev = s.ws + b * s.ws_ld;
      T* gates = s.ws + b * s.ws_ld + s.Hout;
      T* gh_n = gates + 3 * H;
      T* h = s.h_out + b * s.h_out_ld;
      for (int64_t j = 0; j < H; ++j) {
        const auto a = math::gru_forward<T>(gi[j], gi[H + j], gi[2 * H + j], gh[j], gh[H + j], gh[2 * H + j], h_prev[j]);
        gates[j] = a.r;
        gates[H + j] = a.z;
        gates[2 * H + j] = a.n;
        gh_n[j] = gh[2 * H + j];
        h[j] = a.h;
      }
    }
  }

  template <typename T>
  static void backward_rows(const BackwardStep<T>& s, int64_t b0, int64_t b1) {
    const int64_t H = s.H;
    for (int64_t b = b0; b < b1; ++b) {
      const T* dh = s.dh + b * s.dh_ld;
      const T* h_prev = s.ws + b * s.ws_ld;
      const T* gates = h_prev + s.Hout;
      const T* gh_n = gates + 3 * H;
      T* d_gi = s.d_gi + b * s.d_gi_ld;
      T* d_gh = s.d_gh + b * s.d_gh_ld;
      T* dh_prev = s.dh_prev + b * s.dh_prev_ld;
      for (int64_t j = 0; j < H; ++j) {
        const auto d = math::gru_backward<T>(dh[j], gates[j], gates[H + j], gates[2 * H + j], gh_n[j], h_prev[j]);
        d_gi[j] = d_gh[j] = d.d_r;
        d_gi[H + j] = d_gh[H + j] = d.d_z;
        d_gi[2 * H + j] = d.d_gi_n;
        d_gh[2 * H + j] = d.d_gh_n;
        dh_prev[j] = d.dh_prev_direct;
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                                 const OptTensor& b_ih, const OptTensor& b_hh,
                                                                 const OptTensor& batch_sizes, bool reverse) {
  auto [y, h_n, c_n, ws] =
      layer_forward<GruCell>(x, h0, std::nullopt, w_ih, w_hh, b_ih, b_hh, std::nullopt, batch_sizes, reverse);
  return {y, h_n, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_backward(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& batch_sizes, bool reverse, bool has_bias, const at::Tensor& y,
    const at::Tensor& workspace) {
  auto g = layer_backward<GruCell>(grad_y, grad_h_n, std::nullopt, x, w_ih, w_hh, std::nullopt, batch_sizes, reverse,
                                   has_bias, y, workspace);
  return {g[0], g[1], g[3], g[4], g[5], g[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  m.impl("gru_layer_forward", &gru_layer_forward);
  m.impl("gru_layer_backward", &gru_layer_backward);
}

}  // namespace cpu
}  // namespace rnnext

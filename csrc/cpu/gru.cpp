// GRU on the CPU: the cell policy for layer_loop.h and the op registrations.
//
// Workspace columns: [ r z n (3H) | gh_n (H) ]. b_hh stays in the recurrent GEMM
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
  static constexpr bool kReadsHPrevInBackward = true;  // the gate gradients need h_prev (dz = dh * (h_prev - n))
  static int64_t cell_ws_cols(int64_t H) { return 4 * H; }

  // One batch row over a block of n hidden units: gi, gh hold the 3 gates with gate strides
  // gi_gs and gh_gs; h_prev [n]; saved = the row's workspace blocks [r, z, n, gh_n] with gate
  // stride ws_gs (written when kSave); h [n]. restrict parameters let the j loop vectorise.
  template <typename T, bool kSave>
  RNNEXT_ALWAYS_INLINE static void forward_row(int64_t n, const T* __restrict__ gi, int64_t gi_gs,
                                               const T* __restrict__ gh, int64_t gh_gs,
                                               const T* __restrict__ h_prev, T* __restrict__ saved, int64_t ws_gs,
                                               T* __restrict__ h) {
    for (int64_t j = 0; j < n; ++j) {
      const auto a = math::gru_forward<T>(gi[j], gi[gi_gs + j], gi[2 * gi_gs + j], gh[j], gh[gh_gs + j],
                                          gh[2 * gh_gs + j], h_prev[j]);
      if constexpr (kSave) {
        saved[j] = a.r;
        saved[ws_gs + j] = a.z;
        saved[2 * ws_gs + j] = a.n;
        saved[3 * ws_gs + j] = gh[2 * gh_gs + j];
      }
      h[j] = a.h;
    }
  }

  template <typename T>
  RNNEXT_SIMD_CLONES static void forward_rows(const ForwardStep<T>& s, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* gi = s.gi + b * s.gi_ld;
      const T* gh = s.gh + b * s.gh_ld;
      const T* h_prev = s.h_prev + b * s.h_prev_ld;
      T* h = s.h_out + b * s.h_out_ld;
      if (s.ws) {
        forward_row<T, true>(s.n, gi, s.gi_gs, gh, s.gh_gs, h_prev, s.ws + b * s.ws_ld, s.H, h);
      } else {
        forward_row<T, false>(s.n, gi, s.gi_gs, gh, s.gh_gs, h_prev, nullptr, s.H, h);
      }
    }
  }

  // One batch row: dh [H]; h_prev [H]; saved [r, z, n, gh_n] from the workspace; d_gi, d_gh
  // [3H] (equal but for n); dh_prev [H] receives the direct z * dh term.
  template <typename T>
  RNNEXT_ALWAYS_INLINE static void backward_row(int64_t H, const T* __restrict__ dh, const T* __restrict__ h_prev,
                                                const T* __restrict__ saved, T* __restrict__ d_gi,
                                                T* __restrict__ d_gh, T* __restrict__ dh_prev) {
    for (int64_t j = 0; j < H; ++j) {
      const auto d = math::gru_backward<T>(dh[j], saved[j], saved[H + j], saved[2 * H + j], saved[3 * H + j], h_prev[j]);
      d_gi[j] = d.d_r;
      d_gh[j] = d.d_r;
      d_gi[H + j] = d.d_z;
      d_gh[H + j] = d.d_z;
      d_gi[2 * H + j] = d.d_gi_n;
      d_gh[2 * H + j] = d.d_gh_n;
      dh_prev[j] = d.dh_prev_direct;
    }
  }

  template <typename T>
  RNNEXT_SIMD_CLONES static void backward_rows(const BackwardStep<T>& s, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      backward_row<T>(s.H, s.dh + b * s.dh_ld, s.h_prev + b * s.Hout, s.ws + b * s.ws_ld, s.d_gi + b * s.d_gi_ld,
                      s.d_gh + b * s.d_gh_ld,
                      s.dh_prev + b * s.dh_prev_ld);
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_forward(const at::Tensor& x, const at::Tensor& h0,
                                                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                                 const OptTensor& b_ih, const OptTensor& b_hh,
                                                                 const OptTensor& batch_sizes, bool reverse,
                                                                 bool need_backward) {
  auto [y, h_n, c_n, ws] = layer_forward<GruCell>(x, h0, std::nullopt, w_ih, w_hh, b_ih, b_hh, std::nullopt,
                                                  batch_sizes, reverse, need_backward);
  return {y, h_n, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_backward(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& batch_sizes, bool reverse, bool has_bias, const at::Tensor& y,
    const at::Tensor& workspace, const at::Tensor& h0, bool need_grad_x, bool need_grad_weights) {
  auto g = layer_backward<GruCell>(grad_y, grad_h_n, std::nullopt, x, w_ih, w_hh, std::nullopt, batch_sizes, reverse,
                                   has_bias, y, workspace, h0, std::nullopt, need_grad_x, need_grad_weights);
  return {g[0], g[1], g[3], g[4], g[5], g[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  m.impl("gru_layer_forward", &gru_layer_forward);
  m.impl("gru_layer_backward", &gru_layer_backward);
}

}  // namespace cpu
}  // namespace rnnext

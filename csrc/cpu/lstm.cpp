// LSTM on the CPU: the cell policy for layer_loop.h and the op registrations.
//
// Workspace columns: [ i f g o (4H) | c (H) ], then r (H) with a projection. c_prev is not
// saved: it is the previous step's c (or c0), which backward reads from there. b_hh is
// folded into the input projection (gi = x W_ih^T + b_ih + b_hh).
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
  static constexpr bool kReadsHPrevInBackward = false;
  static int64_t cell_ws_cols(int64_t H) { return 5 * H; }
  static constexpr int64_t kCellStateCol = 4;  // c is workspace block 4

  // One batch row over a block of n hidden units: gi, gh hold the 4 gates with gate strides
  // gi_gs and gh_gs; c [n] in/out; the row's workspace as separate [n] blocks i, f, g, o,
  // c_new; h [n]. restrict parameters, one per written block, let the j loop vectorise.
  template <typename T, bool kSave>
  RNNEXT_ALWAYS_INLINE static void forward_row(int64_t n, const T* __restrict__ gi, int64_t gi_gs,
                                               const T* __restrict__ gh, int64_t gh_gs, T* __restrict__ c,
                                               T* __restrict__ i_out,
                                               T* __restrict__ f_out, T* __restrict__ g_out, T* __restrict__ o_out,
                                               T* __restrict__ c_out, T* __restrict__ h) {
    for (int64_t j = 0; j < n; ++j) {
      const T c_prev = c[j];
      const auto a = math::lstm_forward<T>(gi[j] + gh[j], gi[gi_gs + j] + gh[gh_gs + j],
                                           gi[2 * gi_gs + j] + gh[2 * gh_gs + j],
                                           gi[3 * gi_gs + j] + gh[3 * gh_gs + j], c_prev);
      if constexpr (kSave) {
        i_out[j] = a.i;
        f_out[j] = a.f;
        g_out[j] = a.g;
        o_out[j] = a.o;
        c_out[j] = a.c;
      }
      c[j] = a.c;
      h[j] = a.h;
    }
  }

  template <typename T>
  RNNEXT_SIMD_CLONES static void forward_rows(const ForwardStep<T>& s, int64_t b0, int64_t b1) {
    const int64_t H = s.H;
    for (int64_t b = b0; b < b1; ++b) {
      const T* gi = s.gi + b * s.gi_ld;
      const T* gh = s.gh + b * s.gh_ld;
      T* c = s.c_state + b * H;
      T* h = s.h_out + b * s.h_out_ld;
      if (s.ws) {
        T* w = s.ws + b * s.ws_ld;
        forward_row<T, true>(s.n, gi, s.gi_gs, gh, s.gh_gs, c, w, w + H, w + 2 * H, w + 3 * H,
                             w + kCellStateCol * H, h);
      } else {
        forward_row<T, false>(s.n, gi, s.gi_gs, gh, s.gh_gs, c, nullptr, nullptr, nullptr, nullptr, nullptr, h);
      }
    }
  }

  // One batch row: dh [H]; dc [H] in (gradient of c_t) / out (of c_prev); saved as above;
  // c_prev [H]; d_gates [4H] gradients of the pre-activations i, f, g, o.
  template <typename T>
  RNNEXT_ALWAYS_INLINE static void backward_row(int64_t H, const T* __restrict__ dh, T* __restrict__ dc,
                                                const T* __restrict__ saved, const T* __restrict__ c_prev,
                                                T* __restrict__ d_gates) {
    for (int64_t j = 0; j < H; ++j) {
      const auto d = math::lstm_backward<T>(dh[j], dc[j], saved[j], saved[H + j], saved[2 * H + j],
                                            saved[3 * H + j], saved[4 * H + j], c_prev[j]);
      d_gates[j] = d.d_i;
      d_gates[H + j] = d.d_f;
      d_gates[2 * H + j] = d.d_g;
      d_gates[3 * H + j] = d.d_o;
      dc[j] = d.d_c_prev;
    }
  }

  template <typename T>
  RNNEXT_SIMD_CLONES static void backward_rows(const BackwardStep<T>& s, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      // c_prev: the previous step's c where the row had a previous step, else c0.
      const T* c_prev = b < s.carried ? s.ws_prev + b * s.ws_ld + kCellStateCol * s.H : s.c0 + b * s.H;
      backward_row<T>(s.H, s.dh + b * s.dh_ld, s.dc_state + b * s.H, s.ws + b * s.ws_ld, c_prev,
                      s.d_gi + b * s.d_gi_ld);
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse,
    bool need_backward) {
  return layer_forward<LstmCell>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, need_backward);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const OptTensor& w_hr,
                    const OptTensor& batch_sizes, bool reverse, bool has_bias, const at::Tensor& y,
                    const at::Tensor& workspace, const at::Tensor& h0, const at::Tensor& c0, bool need_grad_x,
                    bool need_grad_weights) {
  auto g = layer_backward<LstmCell>(grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, batch_sizes, reverse, has_bias,
                                    y, workspace, h0, c0, need_grad_x, need_grad_weights);
  return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward);
  m.impl("lstm_layer_backward", &lstm_layer_backward);
}

}  // namespace cpu
}  // namespace rnnext

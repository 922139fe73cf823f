// LSTM on the CPU: the cell policy for layer_loop.h and the op registrations.
//
// The workspace is LstmTraits' (../workspace.h): [ i f g o | c ], then r with a projection;
// c_prev is the previous step's c (or c0). b_hh is folded into the input projection
// (gi = x W_ih^T + b_ih + b_hh).
#include <torch/library.h>

#include "../cell_math.h"
#include "layer_loop.h"

namespace rnnext {
namespace cpu {
namespace {

struct LstmCell : LstmTraits {

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
        forward_row<T, true>(s.n, gi, s.gi_gs, gh, s.gh_gs, c, w + kI * H, w + kF * H, w + kG * H, w + kO * H,
                             w + kC * H, h);
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
      const auto d = math::lstm_backward<T>(dh[j], dc[j], saved[kI * H + j], saved[kF * H + j], saved[kG * H + j],
                                            saved[kO * H + j], saved[kC * H + j], c_prev[j]);
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
      const T* c_prev = b < s.carried ? s.ws_prev + b * s.ws_ld + kC * s.H : s.c0 + b * s.H;
      backward_row<T>(s.H, s.dh + b * s.dh_ld, s.dc_state + b * s.H, s.ws + b * s.ws_ld, c_prev,
                      s.d_gi + b * s.d_gi_ld);
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  m.impl("lstm_layer_forward", &LstmOps<CpuLoop, LstmCell>::forward);
  m.impl("lstm_layer_backward", &LstmOps<CpuLoop, LstmCell>::backward);
}

}  // namespace cpu
}  // namespace rnnext

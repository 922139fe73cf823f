// GRU on the CPU: the cell policy for layer_loop.h and the op registrations.
//
// The workspace is GruTraits' (../workspace.h): [ r z n | gh_n ]. b_hh stays in the
// recurrent GEMM (gh = h_prev W_hh^T + b_hh) because r multiplies gh_n = W_hn h_prev + b_hn.
#include <torch/library.h>

#include "../cell_math.h"
#include "layer_loop.h"

namespace rnnext {
namespace cpu {
namespace {

struct GruCell : GruTraits {

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
        saved[kR * ws_gs + j] = a.r;
        saved[kZ * ws_gs + j] = a.z;
        saved[kN * ws_gs + j] = a.n;
        saved[kGhN * ws_gs + j] = gh[2 * gh_gs + j];
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
      const auto d = math::gru_backward<T>(dh[j], saved[kR * H + j], saved[kZ * H + j], saved[kN * H + j],
                                            saved[kGhN * H + j], h_prev[j]);
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

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  m.impl("gru_layer_forward", &SingleStateOps<CpuLoop, GruCell>::forward);
  m.impl("gru_layer_backward", &SingleStateOps<CpuLoop, GruCell>::backward);
}

}  // namespace cpu
}  // namespace rnnext

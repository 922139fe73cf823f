// What every backend must agree on about each cell: its gates, its state, how its gradients
// flow, and the training workspace its forward saves for its backward. Host+device: the CPU
// loops, the CUDA kernels and (through rnnext._C.workspace_blocks) the Python fake kernels all
// read these definitions, so one workspace shape serves every device.
//
// Workspace [N, ws_cols], one row per sequence row (N = T*B padded, sum(batch_sizes) packed),
// in blocks of H columns, written by the training forward and read by the backward:
//   LSTM  [ i | f | g | o | c ]       activated gates and the new cell state
//   GRU   [ r | z | n | gh_n ]        gh_n = W_hn h_prev + b_hn (r multiplies it)
//   RNN   [ ]                         h_t is the output row itself
// then, for an LSTM with proj_size, one more block [ r ] = o * tanh(c), the input of W_hr.
// Not saved, because it is already in memory:
//   h_prev of a row: the previous step's output row of that row (step t-1 forward, t+1 in
//     reverse), or h0 for a row that begins at this step (a packed sequence in reverse);
//   c_prev (LSTM): the c block of the previous step's workspace row, or c0 likewise.
// Inference (need_backward=false) returns the workspace empty, [0, ws_cols].
#pragma once

#include <cstdint>

#include "cell_math.h"

namespace rnnext {

// Workspace blocks per cell (see above), and the cell's facts every backend uses.
struct LstmTraits {
  enum Block : int64_t { kI = 0, kF, kG, kO, kC, kBlocks };
  static constexpr int64_t kGates = 4;         // i, f, g, o: torch.nn's order
  static constexpr bool kHasCellState = true;  // c, with c0 / c_n
  // b_hh may be folded into the input side: pre = gi + gh and both biases simply add.
  static constexpr bool kRecurrentBias = false;
  // The gate gradients of the input and the hidden side are equal (one d_gates buffer).
  static constexpr bool kSeparateHiddenGrad = false;
  // dh_prev = d_gates @ W_hh alone (no direct term to add to).
  static constexpr bool kDirectHiddenGrad = false;
  // The pointwise backward reads h_prev (else it is needed only for dW_hh).
  static constexpr bool kReadsHPrevInBackward = false;
};

struct GruTraits {
  enum Block : int64_t { kR = 0, kZ, kN, kGhN, kBlocks };
  static constexpr int64_t kGates = 3;  // r, z, n
  static constexpr bool kHasCellState = false;
  // b_hn sits inside r * (W_hn h_prev + b_hn): b_hh stays on the recurrent side.
  static constexpr bool kRecurrentBias = true;
  // d gh_n = r * d gi_n: the hidden side's gate gradients differ from the input side's in n.
  static constexpr bool kSeparateHiddenGrad = true;
  // dh_prev = z * dh + d_gh @ W_hh: the pointwise pass writes the first term, the GEMM adds.
  static constexpr bool kDirectHiddenGrad = true;
  static constexpr bool kReadsHPrevInBackward = true;  // dz = dh * (h_prev - n) * z (1 - z)
};

struct RnnTraits {
  enum Block : int64_t { kBlocks = 0 };
  static constexpr int64_t kGates = 1;
  static constexpr bool kHasCellState = false;
  static constexpr bool kRecurrentBias = false;
  static constexpr bool kSeparateHiddenGrad = false;
  static constexpr bool kDirectHiddenGrad = false;
  static constexpr bool kReadsHPrevInBackward = false;
};

namespace workspace {

// Columns of a workspace row: the cell's blocks, plus the projection input r with proj_size.
RNNEXT_HOST_DEVICE int64_t cols(int64_t cell_blocks, int64_t H, bool proj) {
  return (cell_blocks + (proj ? 1 : 0)) * H;
}

// First column of the projection input r = o * tanh(c) (LSTM with proj_size).
RNNEXT_HOST_DEVICE int64_t proj_col(int64_t cell_blocks, int64_t H) { return cell_blocks * H; }

}  // namespace workspace
}  // namespace rnnext

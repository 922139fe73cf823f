// Argument checks and the packed-step layout of the layer ops, for every device.
//
// Each backend's kernels call check_forward_args / check_backward_args first: every tensor
// argument is checked for its device, dtype and full shape, with a message that names it, so
// a malformed call raises instead of being reinterpreted. The step layout (Steps) is host
// data: batch_sizes is a CPU tensor on every device, as in torch's PackedSequence.
//
// Sequence layout: x is [T, B, I] (padded, every step has B rows) or [N, I] with
// batch_sizes [T] (packed: step t owns the rows offset[t] .. offset[t] + batch_sizes[t], sorted
// by decreasing length, exactly torch's PackedSequence.data). A padded sequence is the packed
// one with batch_sizes = [B] * T, so one loop serves both. Without batch_sizes a 2-D x [B, I]
// is one step (the *Cell modules: y is then [B, Hout], and no view is made on either side).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "workspace.h"

namespace rnnext {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Step layout of a padded or packed sequence.
struct Steps {
  int64_t T = 0, B = 0, N = 0;
  std::vector<int64_t> rows, offset;  // per time step
};

// The step processed just before step t: t - 1 forward, t + 1 in reverse; -1 for the first.
inline int64_t previous_step(const Steps& st, int64_t t, bool reverse) {
  const int64_t prev = reverse ? t + 1 : t - 1;
  return (prev < 0 || prev >= st.T) ? -1 : prev;
}

// Rows of step t that the previous step (in processing order) also had: their h_prev is
// the previous step's output, the rest begin here from h0 (only a packed sequence in reverse
// has such rows).
inline int64_t carried_rows(const Steps& st, int64_t t, bool reverse) {
  const int64_t prev = previous_step(st, t, reverse);
  return prev < 0 ? 0 : std::min(st.rows[t], st.rows[prev]);
}

inline Steps make_steps(const Tensor& x, const OptTensor& batch_sizes, int64_t B) {
  Steps s;
  s.B = B;
  if (batch_sizes.has_value()) {
    const Tensor& bsz = *batch_sizes;
    TORCH_CHECK(x.dim() == 2, "rnnext: packed input must be 2-D [N, input_size], got ", x.dim(), "-D");
    TORCH_CHECK(bsz.dim() == 1 && bsz.scalar_type() == at::kLong && bsz.device().is_cpu(),
                "rnnext: batch_sizes must be a 1-D int64 CPU tensor");
    const Tensor bc = bsz.contiguous();
    const int64_t* p = bc.data_ptr<int64_t>();
    s.T = bc.numel();
    TORCH_CHECK(s.T > 0, "rnnext: batch_sizes is empty");
    int64_t total = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      TORCH_CHECK(p[t] > 0 && p[t] <= B && (t == 0 || p[t] <= p[t - 1]),
                  "rnnext: batch_sizes must be positive, non-increasing and at most the batch "
                  "size of the initial state (", B, "); got ", p[t], " at step ", t);
      s.offset.push_back(total);
      s.rows.push_back(p[t]);
      total += p[t];
    }
    TORCH_CHECK(p[0] == B, "rnnext: batch_sizes[0] (", p[0], ") must equal the batch size of the initial state (", B, ")");
    TORCH_CHECK(total == x.size(0), "rnnext: batch_sizes sum to ", total, " but the packed input has ", x.size(0), " rows");
    s.N = total;
  } else {
    // (make_steps runs after the checks that x is 2-D or 3-D)
    const int64_t batch = x.size(x.dim() - 2);
    TORCH_CHECK(batch == B, "rnnext: input batch size ", batch, " does not match the initial state's ", B);
    s.T = x.dim() == 3 ? x.size(0) : 1;
    TORCH_CHECK(s.T > 0, "rnnext: the input sequence is empty (0 time steps)");
    for (int64_t t = 0; t < s.T; ++t) {
      s.offset.push_back(t * B);
      s.rows.push_back(B);
    }
    s.N = s.T * B;
  }
  return s;
}

inline void check_same(const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "rnnext: ", name, " is on ", t.device(), " but the input is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rnnext: ", name, " has dtype ", t.scalar_type(),
              " but the input has dtype ", ref.scalar_type());
}

inline void check_shape(const Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "rnnext: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Which device a backend's kernels run on. Both take float32, float64, float16 and bfloat16.
// The training workspace holds the input's dtype, except float16/bfloat16 on the CPU: its loops
// compute those in float32 and keep their float32 gates, since gates rounded to bfloat16 cost
// the backward several units of roundoff (a bias gradient 4x torch.nn's error, measured
// against float64). rnnext/_ops.py's fake kernels follow workspace_dtype.
struct Backend {
  at::DeviceType device;
  bool float32_workspace_for_half;
};
constexpr Backend kCpuBackend{at::kCPU, true};
constexpr Backend kCudaBackend{at::kCUDA, false};

inline bool is_half(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

inline at::ScalarType workspace_dtype(const Backend& backend, at::ScalarType input) {
  return is_half(input) && backend.float32_workspace_for_half ? at::kFloat : input;
}

// Sizes of a layer, read from (and checked against) its weights, and its step layout.
struct LayerSizes {
  int64_t I, H, Hout, G;
  bool proj;
  Steps steps;
  int64_t ws_cols;
};

template <class Cell>
LayerSizes check_weights(const Backend& backend, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                         const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr) {
  TORCH_CHECK(x.device().type() == backend.device, "rnnext: this op's ", c10::DeviceTypeName(backend.device),
              " kernel got an input on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "rnnext: input must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3,
              "rnnext: input x must be 3-D [T, B, I], or 2-D: one step [B, I], or packed [N, I], got ", x.dim(), "-D");
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2, "rnnext: w_ih and w_hh must be 2-D");
  check_same(x, w_ih, "w_ih");
  check_same(x, w_hh, "w_hh");
  LayerSizes s;
  s.G = Cell::kGates;
  TORCH_CHECK(w_ih.size(0) % s.G == 0, "rnnext: w_ih must have ", s.G,
              " * hidden_size rows, got ", w_ih.size(0));
  s.H = w_ih.size(0) / s.G;
  s.I = w_ih.size(1);
  TORCH_CHECK(x.size(-1) == s.I, "rnnext: input has ", x.size(-1), " features but w_ih expects ", s.I);
  s.proj = w_hr.has_value();
  if (s.proj) {
    check_same(x, *w_hr, "w_hr");
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == s.H && w_hr->size(0) > 0,
                "rnnext: w_hr must have shape [proj_size, ", s.H, "], got ", w_hr->sizes());
    s.Hout = w_hr->size(0);
  } else {
    s.Hout = s.H;
  }
  check_shape(w_hh, {s.G * s.H, s.Hout}, "w_hh");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "rnnext: give both biases or neither");
  if (b_ih.has_value()) {
    check_same(x, *b_ih, "b_ih");
    check_same(x, *b_hh, "b_hh");
    check_shape(*b_ih, {s.G * s.H}, "b_ih");
    check_shape(*b_hh, {s.G * s.H}, "b_hh");
  }
  s.ws_cols = workspace::cols(Cell::kBlocks, s.H, s.proj);
  return s;
}

// An initial state (or its gradient) [B, cols] on the input's device and dtype.
inline void check_state(const Tensor& x, const Tensor& t, int64_t B, int64_t cols, const char* name) {
  check_same(x, t, name);
  TORCH_CHECK(t.dim() == 2, "rnnext: ", name, " must be 2-D [batch, ", cols, "], got ", t.sizes());
  check_shape(t, {B, cols}, name);
}

// Every argument of a forward op; returns the sizes and the step layout.
template <class Cell>
LayerSizes check_forward_args(const Backend& backend, const Tensor& x, const Tensor& h0, const OptTensor& c0,
                              const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                              const OptTensor& w_hr, const OptTensor& batch_sizes) {
  LayerSizes s = check_weights<Cell>(backend, x, w_ih, w_hh, b_ih, b_hh, w_hr);
  check_same(x, h0, "h0");
  TORCH_CHECK(h0.dim() == 2, "rnnext: h0 must be 2-D [batch, ", s.Hout, "], got ", h0.sizes());
  const int64_t B = h0.size(0);
  check_state(x, h0, B, s.Hout, "h0");
  if (Cell::kHasCellState) {
    TORCH_CHECK(c0.has_value(), "rnnext: c0 is required");
    check_state(x, *c0, B, s.H, "c0");
  }
  s.steps = make_steps(x, batch_sizes, B);
  return s;
}

// Every argument of a backward op: the gradients of the outputs (each optional: absent is
// zero) and what the forward returned and saved (y and grad_y of y's full shape, the
// workspace of its full shape). The batch size is h0's.
template <class Cell>
LayerSizes check_backward_args(const Backend& backend, const OptTensor& grad_y, const OptTensor& grad_h_n,
                               const OptTensor& grad_c_n, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                               const OptTensor& w_hr, const OptTensor& batch_sizes, const Tensor& y,
                               const Tensor& ws, const Tensor& h0, const OptTensor& c0) {
  LayerSizes s = check_weights<Cell>(backend, x, w_ih, w_hh, std::nullopt, std::nullopt, w_hr);
  check_same(x, h0, "h0");
  TORCH_CHECK(h0.dim() == 2, "rnnext: h0 must be 2-D [batch, ", s.Hout, "], got ", h0.sizes());
  const int64_t B = h0.size(0);
  check_state(x, h0, B, s.Hout, "h0");
  if (grad_h_n.has_value()) check_state(x, *grad_h_n, B, s.Hout, "grad_h_n");
  if (Cell::kHasCellState) {
    TORCH_CHECK(c0.has_value(), "rnnext: c0 is required");
    check_state(x, *c0, B, s.H, "c0");
    if (grad_c_n.has_value()) check_state(x, *grad_c_n, B, s.H, "grad_c_n");
  }
  s.steps = make_steps(x, batch_sizes, B);
  std::vector<int64_t> y_shape(x.sizes().begin(), x.sizes().end());
  y_shape.back() = s.Hout;
  if (grad_y.has_value()) {
    check_same(x, *grad_y, "grad_y");
    check_shape(*grad_y, y_shape, "grad_y");
  }
  check_same(x, y, "y");
  check_shape(y, y_shape, "y");
  TORCH_CHECK(ws.device() == x.device(), "rnnext: workspace is on ", ws.device(), " but the input is on ",
              x.device());
  const auto ws_dtype = workspace_dtype(backend, x.scalar_type());
  TORCH_CHECK(ws.scalar_type() == ws_dtype, "rnnext: workspace has dtype ", ws.scalar_type(), " but the forward saves ",
              ws_dtype, " for input dtype ", x.scalar_type());
  check_shape(ws, {s.steps.N, s.ws_cols}, "workspace");
  return s;
}

}  // namespace rnnext

// The op signatures of csrc/rnnext.cpp, written once over a backend's time loop.
//
// Loop is a backend's struct of two templates over a cell (the CPU's in csrc/cpu/layer_loop.h,
// CUDA's in csrc/cuda/layer_loop.cuh):
//   forward<Cell>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, need_backward)
//     -> (y, h_n, c_n, workspace), c_n undefined without a cell state;
//   backward<Cell>(grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, batch_sizes, reverse, has_bias,
//                  y, workspace, h0, c0, need_grad_x, need_grad_weights, need_grad_h0)
//     -> [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr],
//     with grad_y, grad_h_n and grad_c_n optional (absent: zero).
// Each backend registers &SingleStateOps<Loop, Cell>::forward etc. for its dispatch key.
//
// Weights reach the loops contiguous (a copy only where the caller's are not): the products
// then read the same memory whatever layout was given, so any layout gives the same bits.
//
// Autocast is off inside the ops: they return the dtype of their arguments (the modules cast
// them first, or round the outputs, where torch.nn's layers would give another dtype), so
// the GEMMs the loops call through ATen (at::mm) keep that dtype too, whatever autocast
// region calls the op. (The CPU computes float16/bfloat16 in float32: csrc/cpu/layer_loop.h.)
#pragma once

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <tuple>
#include <vector>

#include "layer_checks.h"

namespace rnnext {

inline OptTensor contiguous(const OptTensor& t) { return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt; }

// d^T @ in through ATen: weight_grads' products unless a backend gives its own.
struct AtenTransposedProduct {
  Tensor operator()(const Tensor& d, const Tensor& in) const { return at::mm(d.t(), in); }
};

// The weight gradients of a backward, after its step loop, on any device: single GEMMs over
// all steps (d_t_times(d, in) = d^T @ in) and column sums for the biases (no atomics:
// deterministic), empty [0] for what is absent. d_gi, d_gh [N, G*H] (the same tensor where
// the cell's two sides agree), x [N, I], h_prev [N, Hout]; with a projection dh [N, Hout]
// (the gradient of each step's h) and r [N, H] (its input, o * tanh(c)). Returns
// {w_ih, w_hh, b_ih, b_hh, w_hr}.
template <class Product = AtenTransposedProduct>
std::vector<Tensor> weight_grads(const Tensor& d_gi, const Tensor& d_gh, const Tensor& x, const Tensor& h_prev,
                                 bool has_bias, const OptTensor& dh, const OptTensor& r, const Product& d_t_times = {}) {
  std::vector<Tensor> g(5);
  g[0] = d_t_times(d_gi, x);
  g[1] = d_t_times(d_gh, h_prev);
  const bool same_sides = d_gh.is_same(d_gi);
  g[2] = has_bias ? d_gi.sum(0) : x.new_empty({0});
  g[3] = !has_bias ? x.new_empty({0}) : same_sides ? g[2].clone() : d_gh.sum(0);
  g[4] = dh.has_value() ? d_t_times(*dh, *r) : x.new_empty({0});
  return g;
}

// A backward op's outputs from what a backend's step loop computed: [grad_x, grad_h0,
// grad_c0, then the five of weight_grads()], with an empty [0] (a distinct tensor each:
// outputs must not alias) for each gradient not asked for. weight_grads is called only when
// they are (a backend may compute them its own way: the CPU does for a few rows).
template <class WeightGrads>
std::vector<Tensor> backward_outputs(const Tensor& grad_x, const Tensor& dh_state, const Tensor& dc_state,
                                     bool need_grad_h0, bool need_grad_weights, const Tensor& x,
                                     const WeightGrads& weight_grads) {
  std::vector<Tensor> out{grad_x, need_grad_h0 ? dh_state : x.new_empty({0}), dc_state};
  if (need_grad_weights) {
    for (Tensor& g : weight_grads()) out.push_back(std::move(g));
  } else {
    for (int i = 0; i < 5; ++i) out.push_back(x.new_empty({0}));
  }
  return out;
}

// rnn_tanh, rnn_relu, gru: one state h.
template <class Loop, class Cell>
struct SingleStateOps {
  static std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                    const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                                    const OptTensor& batch_sizes, bool reverse, bool need_backward) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto out = Loop::template forward<Cell>(x, h0, std::nullopt, w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh,
                                            std::nullopt, batch_sizes, reverse, need_backward);
    return {std::get<0>(out), std::get<1>(out), std::get<3>(out)};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
      const OptTensor& grad_y, const OptTensor& grad_h_n, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
      const OptTensor& batch_sizes, bool reverse, bool has_bias, const Tensor& y, const Tensor& workspace,
      const Tensor& h0, bool need_grad_x, bool need_grad_weights, bool need_grad_h0) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto g = Loop::template backward<Cell>(grad_y, grad_h_n, std::nullopt, x, w_ih.contiguous(), w_hh.contiguous(),
                                           std::nullopt, batch_sizes, reverse, has_bias, y, workspace, h0,
                                           std::nullopt, need_grad_x, need_grad_weights, need_grad_h0);
    return {g[0], g[1], g[3], g[4], g[5], g[6]};
  }
};

// lstm: states h and c, optional projection w_hr.
template <class Loop, class Cell>
struct LstmOps {
  static std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                            const Tensor& w_ih, const Tensor& w_hh,
                                                            const OptTensor& b_ih, const OptTensor& b_hh,
                                                            const OptTensor& w_hr, const OptTensor& batch_sizes,
                                                            bool reverse, bool need_backward) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return Loop::template forward<Cell>(x, h0, c0, w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh,
                                        contiguous(w_hr), batch_sizes, reverse, need_backward);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
      const OptTensor& grad_y, const OptTensor& grad_h_n, const OptTensor& grad_c_n, const Tensor& x, const Tensor& w_ih,
      const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse, bool has_bias,
      const Tensor& y, const Tensor& workspace, const Tensor& h0, const Tensor& c0, bool need_grad_x,
      bool need_grad_weights, bool need_grad_h0) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto g = Loop::template backward<Cell>(grad_y, grad_h_n, grad_c_n, x, w_ih.contiguous(), w_hh.contiguous(),
                                           contiguous(w_hr), batch_sizes, reverse, has_bias, y, workspace, h0, c0,
                                           need_grad_x, need_grad_weights, need_grad_h0);
    return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]};
  }
};

}  // namespace rnnext

// Autograd of the layer ops, in C++ for every device: the forward op's output gets a graph
// node whose backward calls the backward op (csrc/rnnext.cpp), asking only for the gradients
// autograd needs (need_grad_x / need_grad_weights / need_grad_h0). In Python this formula cost ~70 us per
// call (the generic torch.library wrapper, then a Python autograd.Function), more than a
// whole small time step.
//
// A graph of the gradient (create_graph=True, double backward) cannot come from the backward
// op, which is not differentiable: then the node calls rnnext::layer_grads_with_graph, a
// composite op defined in Python (rnnext/_ops.py) that recomputes the layer with torch ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace rnnext {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using SingleStateForward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const OptTensor&, const OptTensor&,
                                                              const OptTensor&, bool, bool);
using LstmForward = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&, const Tensor&, const OptTensor&,
                                                               const OptTensor&, const OptTensor&, const OptTensor&,
                                                               bool, bool);
using SingleStateBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool, bool,
    const Tensor&, const Tensor&, const Tensor&, bool, bool, bool);
using LstmBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, bool, bool, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, bool, bool);
using GradsWithGraph = std::vector<Tensor>(c10::string_view, const Tensor&, const Tensor&, const OptTensor&,
                                           const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                           const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                           const OptTensor&, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<Sig>();
}

enum Cell { kRnnTanh = 0, kRnnRelu, kGru, kLstm };
constexpr const char* kCellNames[] = {"rnn_tanh", "rnn_relu", "gru", "lstm"};

// Saved variables, in this order (undefined where absent).
enum Saved { kX = 0, kH0, kC0, kWih, kWhh, kBih, kBhh, kWhr, kBatchSizes, kY, kWs, kSaved };

// One layer in one direction. The arguments are the lstm op's; the single-state cells pass
// no c0 and no w_hr. Returns the op's outputs (y, h_n, [c_n,] workspace).
struct LayerFunction : public torch::autograd::Function<LayerFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h0, const OptTensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                               const OptTensor& w_hr, const OptTensor& batch_sizes, bool reverse, bool need_backward,
                               int64_t cell) {
    variable_list out;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const std::string name = std::string("rnnext::") + kCellNames[cell] + "_layer_forward";
      if (cell == kLstm) {
        static const auto op = typed_op<LstmForward>(name);
        auto [y, h_n, c_n, ws] = op.call(x, h0, *c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, need_backward);
        out = {y, h_n, c_n, ws};
      } else {
        static const c10::TypedOperatorHandle<SingleStateForward> ops[] = {
            typed_op<SingleStateForward>("rnnext::rnn_tanh_layer_forward"),
            typed_op<SingleStateForward>("rnnext::rnn_relu_layer_forward"),
            typed_op<SingleStateForward>("rnnext::gru_layer_forward")};
        auto [y, h_n, ws] = ops[cell].call(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, need_backward);
        out = {y, h_n, ws};
      }
    }
    auto opt = [](const OptTensor& t) { return t.has_value() ? *t : Tensor(); };
    ctx->save_for_backward({x, h0, opt(c0), w_ih, w_hh, opt(b_ih), opt(b_hh), opt(w_hr), opt(batch_sizes),
                            out.front(), out.back()});
    ctx->saved_data["cell"] = cell;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["need_backward"] = need_backward;
    ctx->mark_non_differentiable({out.back()});
    // Unused outputs come as undefined gradients rather than materialised zeros (the
    // workspace alone is N x ws_cols); backward makes the zeros it needs.
    ctx->set_materialize_grads(false);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const int64_t cell = ctx->saved_data["cell"].toInt();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const bool is_lstm = cell == kLstm;
    TORCH_CHECK(ctx->saved_data["need_backward"].toBool(), "rnnext::", kCellNames[cell],
                "_layer_forward was called with need_backward=False, so it saved nothing to compute gradients from");
    auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(s[kY]);
    const Tensor grad_h_n = grads[1].defined() ? grads[1] : at::zeros_like(s[kH0]);
    const Tensor grad_c_n = !is_lstm ? Tensor() : grads[2].defined() ? grads[2] : at::zeros_like(s[kC0]);
    const bool has_bias = s[kBih].defined();

    // needs_input_grad counts the tensor arguments that were given, in order.
    std::vector<bool> needs(kBatchSizes, false);
    for (int64_t k = 0, edge = 0; k < kBatchSizes; ++k) {
      if (s[k].defined()) needs[k] = ctx->needs_input_grad(edge++);
    }
    std::vector<Tensor> g(kBatchSizes);  // gradients of x .. w_hr
    if (at::GradMode::is_enabled()) {
      static const auto with_graph = typed_op<GradsWithGraph>("rnnext::layer_grads_with_graph");
      g = with_graph.call(kCellNames[cell], grad_y, grad_h_n, opt(grad_c_n), s[kX], s[kH0], opt(s[kC0]), s[kWih],
                          s[kWhh], opt(s[kBih]), opt(s[kBhh]), opt(s[kWhr]), opt(s[kBatchSizes]), reverse);
    } else {
      // The backward ops have no autograd kernel: below autograd they skip the dispatcher's
      // not-implemented fallback, which checks every argument and output (a few us a call).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const bool need_x = needs[kX];
      const bool need_weights = needs[kWih] || needs[kWhh] || needs[kBih] || needs[kBhh] || needs[kWhr];
      const std::string name = std::string("rnnext::") + kCellNames[cell] + "_layer_backward";
      if (is_lstm) {
        static const auto op = typed_op<LstmBackward>(name);
        auto r = op.call(grad_y, grad_h_n, grad_c_n, s[kX], s[kWih], s[kWhh], opt(s[kWhr]), opt(s[kBatchSizes]),
                         reverse, has_bias, s[kY], s[kWs], s[kH0], s[kC0], need_x, need_weights, needs[kH0]);
        g = {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r),
             std::get<4>(r), std::get<5>(r), std::get<6>(r), std::get<7>(r)};
      } else {
        static const c10::TypedOperatorHandle<SingleStateBackward> ops[] = {
            typed_op<SingleStateBackward>("rnnext::rnn_tanh_layer_backward"),
            typed_op<SingleStateBackward>("rnnext::rnn_relu_layer_backward"),
            typed_op<SingleStateBackward>("rnnext::gru_layer_backward")};
        auto r = ops[cell].call(grad_y, grad_h_n, s[kX], s[kWih], s[kWhh], opt(s[kBatchSizes]), reverse, has_bias,
                                s[kY], s[kWs], s[kH0], need_x, need_weights, needs[kH0]);
        g = {std::get<0>(r), std::get<1>(r), Tensor(), std::get<2>(r),
             std::get<3>(r), std::get<4>(r), std::get<5>(r), Tensor()};
      }
    }
    // One entry per forward argument: undefined for what needs no gradient (the ops' [0]
    // placeholders among them: a gradient is skipped only where none is needed), is absent,
    // or is not a tensor (batch_sizes, reverse, need_backward, cell).
    variable_list out(12);
    for (int64_t k = 0; k < kBatchSizes; ++k) {
      if (needs[k]) out[k] = g[k];
    }
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> single_state_autograd(int64_t cell, const Tensor& x, const Tensor& h0,
                                                         const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                         const OptTensor& b_hh, const OptTensor& batch_sizes,
                                                         bool reverse, bool need_backward) {
  auto out = LayerFunction::apply(x, h0, OptTensor(), w_ih, w_hh, b_ih, b_hh, OptTensor(), batch_sizes, reverse,
                                  need_backward, cell);
  return {out[0], out[1], out[2]};
}

template <int64_t kCell>
std::tuple<Tensor, Tensor, Tensor> single_state(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                                const OptTensor& batch_sizes, bool reverse, bool need_backward) {
  return single_state_autograd(kCell, x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, need_backward);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                const OptTensor& b_hh, const OptTensor& w_hr,
                                                const OptTensor& batch_sizes, bool reverse, bool need_backward) {
  auto out = LayerFunction::apply(x, h0, OptTensor(c0), w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                                  need_backward, static_cast<int64_t>(kLstm));
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, Autograd, m) {
  m.impl("rnn_tanh_layer_forward", &single_state<kRnnTanh>);
  m.impl("rnn_relu_layer_forward", &single_state<kRnnRelu>);
  m.impl("gru_layer_forward", &single_state<kGru>);
  m.impl("lstm_layer_forward", &lstm);
}

}  // namespace rnnext

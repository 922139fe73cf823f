// Autograd of the layer ops, in C++ for every device: the forward op's differentiable outputs
// (y, h_n, c_n) get one graph node, LayerBackward, whose apply calls the backward op
// (csrc/rnnext.cpp), asking only for the gradients autograd needs (need_grad_x /
// need_grad_weights / need_grad_h0) and passing an output gradient nothing produced as
// absent, not as zeros. In Python this formula cost ~70 us per call (the generic
// torch.library wrapper, then a Python autograd.Function), more than a whole small time step.
//
// The node is a plain torch::autograd::Node, as torch's generated ones are, rather than a
// torch::autograd::Function: that one's context (a map of saved values, every output wrapped
// and checked) cost ~3 us of a ~16 us RNNCell training step.
//
// A graph of the gradient (create_graph=True, double backward) cannot come from the backward
// op, which is not differentiable: then the node calls rnnext::layer_grads_with_graph, a
// composite op defined in Python (rnnext/_ops.py) that recomputes the layer with torch ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace rnnext {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
// The graph's node pointer: std::shared_ptr<Node> up to torch 2.5, c10::intrusive_ptr since.
using NodePtr = decltype(std::declval<Node&>().getptr());

using SingleStateForward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const OptTensor&, const OptTensor&,
                                                              const OptTensor&, bool, bool);
using LstmForward = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&, const Tensor&, const OptTensor&,
                                                               const OptTensor&, const OptTensor&, const OptTensor&,
                                                               bool, bool);
using SingleStateBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool, bool,
    const Tensor&, const Tensor&, const Tensor&, bool, bool, bool);
using LstmBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, bool, bool, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
    bool, bool);
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
constexpr const char* kNodeNames[] = {"RnnTanhLayerBackward", "RnnReluLayerBackward", "GruLayerBackward",
                                      "LstmLayerBackward"};

// The forward's tensor arguments that can have gradients, in schema order (the lstm op's;
// the single-state cells have no c0 and no w_hr): the node's edges, and its outputs.
enum Input { kX = 0, kH0, kC0, kWih, kWhh, kBih, kBhh, kWhr, kInputs };
// Saved for backward: the inputs above, then batch_sizes, y and the workspace.
enum Saved { kBatchSizes = kInputs, kY, kWs, kSaved };

inline Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
inline OptTensor defined_or_none(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// One layer in one direction: the node behind y, h_n and c_n (input numbers 0, 1, 2).
struct LayerBackward final : public Node {
  LayerBackward(int64_t cell, bool reverse, bool need_backward)
      : cell_(cell), reverse_(reverse), need_backward_(need_backward) {}

  std::string name() const override { return kNodeNames[cell_]; }

  void release_variables() override {
    for (SavedVariable& s : saved_) s.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(need_backward_, "rnnext::", kCellNames[cell_],
                "_layer_forward was called with need_backward=False, so it saved nothing to compute gradients from");
    const bool is_lstm = cell_ == kLstm;
    Tensor s[kSaved];
    for (int k = 0; k < kSaved; ++k) s[k] = saved_[k].unpack(k == kY ? getptr() : nullptr);
    const bool has_bias = s[kBih].defined();
    // Gradients of y, h_n, c_n: undefined where nothing used the output.
    const OptTensor grad_y = defined_or_none(grads[0]);
    const OptTensor grad_h_n = defined_or_none(grads[1]);
    const OptTensor grad_c_n = is_lstm ? defined_or_none(grads[2]) : std::nullopt;
    bool needs[kInputs];
    for (int k = 0; k < kInputs; ++k) needs[k] = s[k].defined() && task_should_compute_output(k);

    variable_list g(kInputs);  // gradients of x .. w_hr
    if (at::GradMode::is_enabled()) {
      // create_graph: gradients with a graph of their own, from torch ops (zeros where absent).
      static const auto with_graph = typed_op<GradsWithGraph>("rnnext::layer_grads_with_graph");
      auto or_zeros = [](const OptTensor& grad, const Tensor& like) {
        return grad.has_value() ? *grad : at::zeros_like(like);
      };
      g = with_graph.call(kCellNames[cell_], or_zeros(grad_y, s[kY]), or_zeros(grad_h_n, s[kH0]),
                          is_lstm ? OptTensor(or_zeros(grad_c_n, s[kC0])) : std::nullopt, s[kX], s[kH0],
                          defined_or_none(s[kC0]), s[kWih], s[kWhh], defined_or_none(s[kBih]),
                          defined_or_none(s[kBhh]), defined_or_none(s[kWhr]), defined_or_none(s[kBatchSizes]),
                          reverse_);
    } else {
      // The backward ops have no autograd kernel: below autograd they skip the dispatcher's
      // not-implemented fallback, which checks every argument and output (a few us a call).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const bool need_x = needs[kX];
      const bool need_weights = needs[kWih] || needs[kWhh] || needs[kBih] || needs[kBhh] || needs[kWhr];
      if (is_lstm) {
        static const auto op = typed_op<LstmBackward>("rnnext::lstm_layer_backward");
        auto r = op.call(grad_y, grad_h_n, grad_c_n, s[kX], s[kWih], s[kWhh], defined_or_none(s[kWhr]),
                         defined_or_none(s[kBatchSizes]), reverse_, has_bias, s[kY], s[kWs], s[kH0], s[kC0], need_x,
                         need_weights, needs[kH0]);
        g = {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r),
             std::get<4>(r), std::get<5>(r), std::get<6>(r), std::get<7>(r)};
      } else {
        static const c10::TypedOperatorHandle<SingleStateBackward> ops[] = {
            typed_op<SingleStateBackward>("rnnext::rnn_tanh_layer_backward"),
            typed_op<SingleStateBackward>("rnnext::rnn_relu_layer_backward"),
            typed_op<SingleStateBackward>("rnnext::gru_layer_backward")};
        auto r = ops[cell_].call(grad_y, grad_h_n, s[kX], s[kWih], s[kWhh], defined_or_none(s[kBatchSizes]),
                                 reverse_, has_bias, s[kY], s[kWs], s[kH0], need_x, need_weights, needs[kH0]);
        g = {std::get<0>(r), std::get<1>(r), Tensor(), std::get<2>(r),
             std::get<3>(r), std::get<4>(r), std::get<5>(r), Tensor()};
      }
    }
    // One gradient per edge: undefined for what needs none (the ops' [0] placeholders among
    // them: a gradient is skipped only where none is needed) or is absent.
    for (int k = 0; k < kInputs; ++k) {
      if (!needs[k]) g[k] = Tensor();
    }
    return g;
  }

  SavedVariable saved_[kSaved];
  int64_t cell_;
  bool reverse_, need_backward_;
};

// A new node of type N, held as the graph holds nodes. (torch <= 2.5 deletes them through
// deleteNode, which frees a long chain without recursing; found by argument lookup, as
// later versions lack it.)
template <class N, class... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::shared_ptr<N>(new N(std::forward<Args>(args)...), [](N* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  }
}

// The forward op below autograd, then (when a gradient will be wanted) its node: edges to
// every tensor input's gradient slot, y, h_n, c_n as its outputs, the inputs and what the
// backward op reads saved. The arguments are the lstm op's; the single-state cells pass no
// c0 and no w_hr. Returns the op's outputs (y, h_n, [c_n,] workspace); the workspace is not
// differentiable.
variable_list layer_forward(int64_t cell, const Tensor& x, const Tensor& h0, const OptTensor& c0, const Tensor& w_ih,
                            const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                            const OptTensor& batch_sizes, bool reverse, bool need_backward) {
  const Tensor inputs[kInputs] = {x,    h0,   value_or_undefined(c0),   w_ih,
                                  w_hh, value_or_undefined(b_ih), value_or_undefined(b_hh), value_or_undefined(w_hr)};
  for (const Tensor& t : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(!t.defined() || !t._fw_grad(/*level=*/0).defined(), "rnnext::", kCellNames[cell],
                                "_layer_forward has no forward-mode AD formula (forward_ad / torch.func.jvp)");
  }
  variable_list out;
  {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (cell == kLstm) {
      static const auto op = typed_op<LstmForward>("rnnext::lstm_layer_forward");
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
  bool requires_grad = false;
  if (at::GradMode::is_enabled()) {
    for (const Tensor& t : inputs) requires_grad = requires_grad || (t.defined() && t.requires_grad());
  }
  if (!requires_grad) return out;

  NodePtr node = make_node<LayerBackward>(cell, reverse, need_backward);
  auto& layer = static_cast<LayerBackward&>(*node);
  node->set_next_edges(torch::autograd::collect_next_edges(inputs[kX], inputs[kH0], inputs[kC0], inputs[kWih],
                                                           inputs[kWhh], inputs[kBih], inputs[kBhh], inputs[kWhr]));
  for (size_t i = 0; i + 1 < out.size(); ++i) torch::autograd::set_history(out[i], node);
  for (int k = 0; k < kInputs; ++k) layer.saved_[k] = SavedVariable(inputs[k], /*is_output=*/false);
  layer.saved_[kBatchSizes] = SavedVariable(value_or_undefined(batch_sizes), false);
  layer.saved_[kY] = SavedVariable(out.front(), /*is_output=*/true);
  layer.saved_[kWs] = SavedVariable(out.back(), /*is_output=*/false);
  return out;
}

template <int64_t kCell>
std::tuple<Tensor, Tensor, Tensor> single_state(const Tensor& x, const Tensor& h0, const Tensor& w_ih,
                                                const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
                                                const OptTensor& batch_sizes, bool reverse, bool need_backward) {
  auto out = layer_forward(kCell, x, h0, std::nullopt, w_ih, w_hh, b_ih, b_hh, std::nullopt, batch_sizes, reverse,
                           need_backward);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm(const Tensor& x, const Tensor& h0, const Tensor& c0,
                                                const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                const OptTensor& b_hh, const OptTensor& w_hr,
                                                const OptTensor& batch_sizes, bool reverse, bool need_backward) {
  auto out = layer_forward(kLstm, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, need_backward);
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

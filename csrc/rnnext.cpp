// Every rnnext op schema. Kernels: csrc/cpu/<cell>.cpp (and csrc/cuda/<cell>.cu when built);
// autograd: csrc/autograd.cpp; fake kernels: rnnext/_ops.py.
//
// A layer op runs one layer in one direction over a whole sequence. x is [T, B, I] (padded)
// or, with batch_sizes [T] (int64, CPU), the [N, I] data of a PackedSequence; without
// batch_sizes a 2-D x [B, I] is one step (y [B, Hout]). `reverse` runs
// the steps from last to first (the backward direction of a bidirectional layer). The last
// output, `workspace` [N, ws_cols], holds what the backward op needs; it is not differentiable.
// With need_backward=false (inference) it is returned empty, [0, ws_cols], and never written.
// A backward op takes the gradients of the forward's outputs, None for one that is zero (an
// output nothing used: a *Cell's y, or h_n of a layer whose outputs alone were used), and
// returns the gradients of the forward's tensor inputs; a missing bias or
// projection gets an empty [0] tensor, and so does a gradient not asked for: need_grad_x=false
// skips grad_x, need_grad_weights=false every weight and bias gradient (their GEMMs are
// most of a backward: an input that is data, or frozen weights, need not pay for them), and
// need_grad_h0=false grad_h0 (the last step's dh_prev product: a quarter of a one-step
// backward, for a state that is data).
#include <Python.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/options.h"
#include "cpu/scratch.h"
#include "layer_checks.h"
#include "workspace.h"

namespace {

// _C.workspace_blocks(cell) -> the cell's workspace blocks of H columns (workspace.h), which
// the fake kernels use for the workspace shape.
PyObject* workspace_blocks(PyObject*, PyObject* arg) {
  const char* cell = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (cell == nullptr) {
    PyErr_SetString(PyExc_TypeError, "workspace_blocks takes a cell name");
    return nullptr;
  }
  if (std::strcmp(cell, "lstm") == 0) return PyLong_FromLongLong(rnnext::LstmTraits::kBlocks);
  if (std::strcmp(cell, "gru") == 0) return PyLong_FromLongLong(rnnext::GruTraits::kBlocks);
  if (std::strcmp(cell, "rnn_tanh") == 0 || std::strcmp(cell, "rnn_relu") == 0) {
    return PyLong_FromLongLong(rnnext::RnnTraits::kBlocks);
  }
  PyErr_Format(PyExc_ValueError, "unknown cell %s", cell);
  return nullptr;
}

// _C.float32_workspace_for_half(device_type) -> whether that backend's workspace is float32
// for float16/bfloat16 inputs (layer_checks.h, workspace_dtype), for the fake kernels.
PyObject* float32_workspace_for_half(PyObject*, PyObject* arg) {
  const char* device = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (device == nullptr) {
    PyErr_SetString(PyExc_TypeError, "float32_workspace_for_half takes a device type name");
    return nullptr;
  }
  if (std::strcmp(device, "cpu") == 0) return PyBool_FromLong(rnnext::kCpuBackend.float32_workspace_for_half);
  if (std::strcmp(device, "cuda") == 0) return PyBool_FromLong(rnnext::kCudaBackend.float32_workspace_for_half);
  PyErr_Format(PyExc_ValueError, "no rnnext backend for device type %s", device);
  return nullptr;
}

// _C.built_with_cuda() -> whether this build has the CUDA kernels.
PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef RNNEXT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// _C.cpu_option(name, value=None) -> the CPU option's value as text (csrc/cpu/options.h:
// own_gemm, mkl_packed, onednn, streaming_bytes, chunk_rows, bf16_gemm); given a value, sets
// it first (validated as its environment variable is). _C.cpu_option() -> all of them, as a dict:
// rnnext/_ops.py calls it at import, so a malformed variable is a ValueError there.
PyObject* cpu_option(PyObject*, PyObject* args) {
  namespace opt = rnnext::cpu::options;
  const char* name = nullptr;
  const char* value = nullptr;
  if (!PyArg_ParseTuple(args, "|zz:cpu_option", &name, &value)) return nullptr;
  try {
    if (name == nullptr) {
      PyObject* all = PyDict_New();
      for (const char* key : {"own_gemm", "mkl_packed", "onednn", "streaming_bytes", "chunk_rows", "bf16_gemm"}) {
        PyObject* text = PyUnicode_FromString(opt::get(key).c_str());
        PyDict_SetItemString(all, key, text);
        Py_DECREF(text);
      }
      return all;
    }
    if (value != nullptr) opt::set(name, value);
    return PyUnicode_FromString(opt::get(name).c_str());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// _C.empty_cache() -> bytes released: drops the CPU ops' kept scratch buffers, every
// thread's (csrc/cpu/scratch.h). _C.scratch_bytes() -> the bytes they keep now.
PyObject* empty_cache(PyObject*, PyObject*) { return PyLong_FromLongLong(rnnext::cpu::empty_cache()); }
PyObject* scratch_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(rnnext::cpu::scratch_bytes()); }

PyMethodDef methods[] = {
    {"empty_cache", empty_cache, METH_NOARGS, "release the CPU ops' scratch buffers (all threads); returns bytes"},
    {"scratch_bytes", scratch_bytes, METH_NOARGS, "bytes of scratch buffers the CPU ops keep (all threads)"},
    {"cpu_option", cpu_option, METH_VARARGS, "get (or set, given a value) a CPU tuning option (csrc/cpu/options.h)"},
    {"workspace_blocks", workspace_blocks, METH_O, "workspace blocks of H columns of a cell (csrc/workspace.h)"},
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "whether this build has the CUDA kernels"},
    {"float32_workspace_for_half", float32_workspace_for_half, METH_O,
     "whether a backend keeps a float32 workspace for half inputs (csrc/layer_checks.h)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// Importing rnnext._C runs the op registrations below (and each backend's kernels').
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rnnext, m) {
  // Tests only: (accumulate ? c : 0) + a @ w^T (+ bias), float32, through the CPU per-step GEMM
  // route named ("avx512", "avx2", "blas" or "auto"), or the few-row kernels and the weight
  // gradients' oneDNN route (csrc/cpu/step_gemm.cpp).
  m.def("_step_gemm(Tensor a, Tensor w, Tensor c, str route, bool accumulate, Tensor? bias=None) -> Tensor");
  // h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)  -> (y, h_n, workspace)
  m.def("rnn_tanh_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? batch_sizes, bool reverse, bool need_backward=True) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)
  m.def("rnn_tanh_layer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor x, Tensor w_ih, Tensor w_hh, "
        "Tensor? batch_sizes, bool reverse, bool has_bias, Tensor y, Tensor workspace, Tensor h0, "
        "bool need_grad_x=True, bool need_grad_weights=True, bool need_grad_h0=True) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // As rnn_tanh, with relu in place of tanh.
  m.def("rnn_relu_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? batch_sizes, bool reverse, bool need_backward=True) -> (Tensor, Tensor, Tensor)");
  m.def("rnn_relu_layer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor x, Tensor w_ih, Tensor w_hh, "
        "Tensor? batch_sizes, bool reverse, bool has_bias, Tensor y, Tensor workspace, Tensor h0, "
        "bool need_grad_x=True, bool need_grad_weights=True, bool need_grad_h0=True) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // GRU, gates r, z, n as torch.nn  -> (y, h_n, workspace)
  m.def("gru_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "Tensor? batch_sizes, bool reverse, bool need_backward=True) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)
  m.def("gru_layer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor x, Tensor w_ih, Tensor w_hh, "
        "Tensor? batch_sizes, bool reverse, bool has_bias, Tensor y, Tensor workspace, Tensor h0, "
        "bool need_grad_x=True, bool need_grad_weights=True, bool need_grad_h0=True) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // LSTM, gates i, f, g, o as torch.nn; w_hr [proj_size, H] projects h  -> (y, h_n, c_n, workspace)
  m.def("lstm_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
        "Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool need_backward=True) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // c0 gives c_prev of the rows' first steps (the workspace keeps c, not c_prev)
  // -> (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr)
  m.def("lstm_layer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor w_ih, "
        "Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool has_bias, Tensor y, "
        "Tensor workspace, Tensor h0, Tensor c0, bool need_grad_x=True, bool need_grad_weights=True, "
        "bool need_grad_h0=True) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Double backward (csrc/autograd.cpp): the gradients of x, h0, c0, w_ih, w_hh, b_ih, b_hh,
  // w_hr ([0] where absent) through a differentiable torch-op recomputation of the layer, so
  // that they have a graph themselves. Composite, implemented in Python (rnnext/_ops.py).
  m.def("layer_grads_with_graph(str cell, Tensor grad_y, Tensor grad_h_n, Tensor? grad_c_n, Tensor x, "
        "Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
        "Tensor? batch_sizes, bool reverse) -> Tensor[]");
}

"""Typed wrappers over ``torch.ops.rnnext.*``, with their fake kernels and the torch-op
recomputation behind double backward (the autograd formula itself is C++: csrc/autograd.cpp).

One op runs one layer in one direction over a whole sequence (schemas: csrc/rnnext.cpp).
``layer_forward`` is the single entry point the rest of the package uses.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _C  # loads the library: registers the ops and their CPU (and CUDA) kernels
from . import _reference

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
# Workspace blocks of hidden_size columns per cell, read from the one definition every
# backend uses (csrc/workspace.h), so the fake kernels below give the real kernels' shape.
_WORKSPACE_BLOCKS = {cell: _C.workspace_blocks(cell) for cell in CELLS}
# The CPU options' environment variables (RNNEXT_OWN_GEMM, ...; csrc/cpu/options.h) are read
# once, here: a malformed value, or a GEMM kernel this CPU lacks, is a ValueError at import.
_C.cpu_option()


def workspace_cols(cell: str, hidden_size: int, proj: bool) -> int:
    """Columns of the workspace: the cell's blocks, plus r = o * tanh(c) with a projection."""
    return (_WORKSPACE_BLOCKS[cell] + (1 if proj else 0)) * hidden_size


# Per backend, whether its workspace is float32 for float16/bfloat16 input (the CPU's loops
# compute and save those in float32): read from csrc/layer_checks.h.
_FLOAT32_WORKSPACE_FOR_HALF = {device: _C.float32_workspace_for_half(device) for device in ("cpu", "cuda")}


def workspace_dtype(x: Tensor) -> torch.dtype:
    """The workspace's dtype for input x (csrc/layer_checks.h, workspace_dtype)."""
    if x.dtype in (torch.float16, torch.bfloat16) and _FLOAT32_WORKSPACE_FOR_HALF.get(x.device.type, False):
        return torch.float32
    return x.dtype


class LayerWeights(NamedTuple):
    """The parameters of one layer in one direction (torch.nn's names in brackets)."""

    w_ih: Tensor  # [G*H, I]      (weight_ih_l{k})
    w_hh: Tensor  # [G*H, Hout]   (weight_hh_l{k})
    b_ih: Optional[Tensor]  # [G*H]  (bias_ih_l{k})
    b_hh: Optional[Tensor]  # [G*H]  (bias_hh_l{k})
    w_hr: Optional[Tensor]  # [Hout, H] (weight_hr_l{k}, LSTM with proj_size)


_FORWARD_OPS = {cell: getattr(torch.ops.rnnext, f"{cell}_layer_forward").default for cell in CELLS}
# The C++ callable behind each overload (what OpOverload.__call__ calls): eager calls use it
# directly, one Python frame fewer (~0.4 us of a ~12 us *Cell step); torch.compile is given
# the overload itself, which it knows.
_FORWARD_KERNELS = {cell: op._op for cell, op in _FORWARD_OPS.items()}


def layer_forward(cell: str, x: Tensor, h0: Tensor, c0: Optional[Tensor], w: LayerWeights,
                  batch_sizes: Optional[Tensor], reverse: bool):
    """One layer, one direction. x: [T, B, I], packed [N, I] with batch_sizes [T], or one step
    [B, I] without batch_sizes.

    Returns (y, h_n, c_n): y [T, B, Hout] (or [N, Hout], [B, Hout]), h_n [B, Hout], c_n [B, H]
    (LSTM) or None.
    The op saves a workspace for backward only when autograd will need one.
    """
    if x.is_cuda:
        autocast_dtype = _autocast_dtype(x)
        if autocast_dtype is not None:
            x, h0, c0, w = _cast((x, h0, c0, w), autocast_dtype)
    compiling = _compiler_is_compiling()
    # A TorchScript trace records the flag as a constant: it always saves the workspace, so the
    # traced graph can train, and traces made with and without grad agree (trace's check).
    # (torch._C._is_tracing is torch.jit.is_tracing outside TorchScript, two frames fewer;
    # Dynamo knows only the latter, and never traces inside a TorchScript trace.)
    need_backward = ((not compiling and torch._C._is_tracing())
                     or (torch.is_grad_enabled() and _any_requires_grad(x, h0, c0, w)))
    if cell == "lstm":
        args = (x, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, batch_sizes, reverse, need_backward)
    else:
        args = (x, h0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, batch_sizes, reverse, need_backward)
    if compiling:
        out = _FORWARD_OPS[cell](*args)
    elif need_backward:
        out = _FORWARD_KERNELS[cell](*args)
    else:
        # Nothing will be recorded: go straight to the kernel, past the autograd kernel.
        with torch._C._AutoDispatchBelowAutograd():
            out = _FORWARD_KERNELS[cell](*args)
    return out[0], out[1], (out[2] if cell == "lstm" else None)


def _any_requires_grad(x: Tensor, h0: Tensor, c0: Optional[Tensor], w: LayerWeights) -> bool:
    """Whether autograd will want gradients from this call: the weights first (they usually
    do), as a chain of tests (a generator over the seven costs ~0.7 us of a ~17 us cell step)."""
    return (w.w_ih.requires_grad or w.w_hh.requires_grad or x.requires_grad or h0.requires_grad
            or (c0 is not None and c0.requires_grad) or (w.b_ih is not None and w.b_ih.requires_grad)
            or (w.b_hh is not None and w.b_hh.requires_grad) or (w.w_hr is not None and w.w_hr.requires_grad))


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype torch.nn's recurrent layers run in under CUDA autocast, for a CUDA x, or None.

    torch.nn's layers meet autocast only through cuDNN's RNN op, whose autocast wrapper
    (aten/src/ATen/cudnn/AutocastRNN.cpp) casts every non-float64 floating tensor to float16,
    whatever dtype autocast was given; with cuDNN off they are not cast at all. rnnext does
    the same, so its outputs have torch.nn's dtypes."""
    if (x.is_cuda and torch.is_autocast_enabled("cuda") and torch.backends.cudnn.enabled
            and torch.backends.cudnn.is_available()):
        return torch.float16
    return None


def _cast(tensors, dtype):
    """x, h0, c0 and the layer's weights in dtype, float64 ones excepted as autocast does
    (differentiable: gradients reach the float32 parameters in their own dtype)."""
    x, h0, c0, w = tensors

    def cast(t):
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    return cast(x), cast(h0), cast(c0), LayerWeights(*(cast(t) for t in w))


# torch.compiler.is_compiling (torch >= 2.3), looked up once: it is asked at every call.
_compiler_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


# ---------------------------------------------------------------- fake (meta) kernels
def _fake_forward(cell, x, h0, c0, w_ih, w_hh, w_hr, need_backward):
    hidden = w_ih.shape[0] // GATES[cell]
    hidden_out = w_hh.shape[1]
    rows = math.prod(x.shape[:-1]) if need_backward else 0
    y = x.new_empty((*x.shape[:-1], hidden_out))
    h_n = h0.new_empty(h0.shape)
    ws = x.new_empty((rows, workspace_cols(cell, hidden, w_hr is not None)), dtype=workspace_dtype(x))
    if cell == "lstm":
        return y, h_n, c0.new_empty(c0.shape), ws
    return y, h_n, ws


def _fake_backward(cell, h0, c0, x, w_ih, w_hh, w_hr, has_bias, need_grad_x, need_grad_weights, need_grad_h0):
    """The gradients' shapes, from h0 and c0 (the output gradients may be None: zero)."""
    def like(t, wanted=True):
        return t.new_empty(t.shape) if wanted and t is not None else x.new_empty((0,))

    bias = (lambda: x.new_empty((w_ih.shape[0],))) if has_bias and need_grad_weights else (lambda: x.new_empty((0,)))
    grads = [like(x, need_grad_x), like(h0, need_grad_h0)]
    if cell == "lstm":
        grads.append(like(c0))
    grads += [like(w_ih, need_grad_weights), like(w_hh, need_grad_weights), bias(), bias()]
    if cell == "lstm":
        grads.append(like(w_hr, need_grad_weights))
    return tuple(grads)


def _register_fakes(cell):
    if cell == "lstm":
        @torch.library.register_fake("rnnext::lstm_layer_forward")
        def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, need_backward=True):
            return _fake_forward(cell, x, h0, c0, w_ih, w_hh, w_hr, need_backward)

        @torch.library.register_fake("rnnext::lstm_layer_backward")
        def _(grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, batch_sizes, reverse, has_bias, y, ws, h0, c0,
              need_grad_x=True, need_grad_weights=True, need_grad_h0=True):
            return _fake_backward(cell, h0, c0, x, w_ih, w_hh, w_hr, has_bias, need_grad_x, need_grad_weights,
                                  need_grad_h0)
    else:
        @torch.library.register_fake(f"rnnext::{cell}_layer_forward")
        def _(x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse, need_backward=True):
            return _fake_forward(cell, x, h0, None, w_ih, w_hh, None, need_backward)

        @torch.library.register_fake(f"rnnext::{cell}_layer_backward")
        def _(grad_y, grad_h_n, x, w_ih, w_hh, batch_sizes, reverse, has_bias, y, ws, h0, need_grad_x=True,
              need_grad_weights=True, need_grad_h0=True):
            return _fake_backward(cell, h0, None, x, w_ih, w_hh, None, has_bias, need_grad_x, need_grad_weights,
                                  need_grad_h0)


# ---------------------------------------------------------------- autograd
# The autograd formula of the forward ops is C++ (csrc/autograd.cpp). Its double backward
# (create_graph=True) calls rnnext::layer_grads_with_graph, implemented here with torch ops.
_GRAD_KEYS = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


@torch.library.impl("rnnext::layer_grads_with_graph", "CompositeImplicitAutograd")
def _layer_grads_with_graph(cell, grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                            batch_sizes, reverse):
    s = dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr, batch_sizes=batch_sizes)
    w = LayerWeights(w_ih, w_hh, b_ih, b_hh, w_hr)
    grads = _reference_grads(cell, s, w, reverse, grad_y, grad_h_n, grad_c_n)
    return [grads[k] if k in grads else x.new_empty((0,)) for k in _GRAD_KEYS]


def _reference_grads(cell, s, w, reverse, grad_y, grad_h_n, grad_c_n):
    """Gradients through a differentiable torch-op recomputation of one layer (double backward)."""
    keys = [k for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr") if s[k] is not None]
    with torch.enable_grad():
        leaves = {k: s[k] if s[k].requires_grad else s[k].detach().requires_grad_() for k in keys}
        y, h_n, c_n = _reference.layer(
            cell, leaves["x"], leaves["h0"], leaves.get("c0"),
            LayerWeights(leaves["w_ih"], leaves["w_hh"], leaves.get("b_ih"), leaves.get("b_hh"),
                         leaves.get("w_hr")),
            s["batch_sizes"], reverse)
        outputs, grad_outputs = [y, h_n], [grad_y, grad_h_n]
        if c_n is not None:
            outputs.append(c_n)
            grad_outputs.append(grad_c_n)
        grads = torch.autograd.grad(outputs, [leaves[k] for k in keys], grad_outputs,
                                    create_graph=True, allow_unused=True)
    out = {k: (torch.zeros_like(s[k]) if g is None else g) for k, g in zip(keys, grads)}
    return out


for _cell in CELLS:
    _register_fakes(_cell)

"""rnnext.RNN, rnnext.LSTM and rnnext.GRU: torch.nn's constructors, parameter names, shapes,
initialisation and forward signatures, running rnnext's own ops.

These deliberately do not subclass torch.nn.RNNBase: TorchDynamo graph-breaks on every
RNNBase subclass, and these modules are meant to compile with fullgraph=True.
"""
from __future__ import annotations

import math
import warnings
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.utils.rnn import PackedSequence

from ._ops import GATES, LayerWeights, layer_forward
from .functional import rnn_stack

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class ArgumentTypeError(AttributeError, TypeError):
    """An argument of the wrong Python type (a tuple where a tensor belongs, ...).

    torch.nn lets these fail as AttributeError (``'tuple' object has no attribute 'dim'``);
    this is caught by ``except AttributeError`` as before, and by ``except TypeError``, with a
    message that names the argument."""


def _apply_permutation(tensor: Tensor, permutation: Tensor, dim: int = 1) -> Tensor:
    return tensor.index_select(dim, permutation)


def _onednn_runs_lstm(x: Tensor) -> bool:
    """Whether torch.nn's LSTM on this padded input x runs oneDNN's LSTM (ATen's use_mkldnn,
    checked on the input as given, before autocast casts it)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) or x.numel() == 0:
        return False
    if x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if x.dtype == torch.float16:
        return not torch.is_grad_enabled() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return x.dtype == torch.float32


class _CpuAutocast(NamedTuple):
    """How a layer or cell call runs under torch.autocast("cpu"): in the parameters' dtype
    (`compute`), its outputs then rounded to the dtypes torch.nn returns (`h` for the output
    and h, `c` for an LSTM's c). See _cpu_autocast."""

    compute: torch.dtype
    h: torch.dtype
    c: Optional[torch.dtype]

    def inputs(self, x: Tensor, h: Tensor, c: Optional[Tensor]):
        # float64 tensors are left alone, as autocast leaves them (then the dtype checks fail
        # as torch.nn does)
        return tuple(t if t is None or t.dtype == torch.float64 else t.to(self.compute) for t in (x, h, c))

    def outputs(self, y: Tensor, h: Tensor, c: Optional[Tensor]):
        return y.to(self.h), h.to(self.h), (None if c is None else c.to(self.c))


def _cpu_autocast(mode: str, weight: Tensor, x: Tensor, h: Tensor, c: Optional[Tensor], *,
                  onednn: bool = False, proj: bool = False) -> Optional[_CpuAutocast]:
    """Called under torch.autocast("cpu") only: the _CpuAutocast of a call, or None where
    autocast does not apply (a tensor on another device, float64, a non-float input).

    torch.nn's recurrent layers meet CPU autocast through its lower-precision op list. oneDNN's
    LSTM (`onednn`: an LSTM layer without projection on padded input, where _onednn_runs_lstm)
    runs wholly in the autocast dtype d. Elsewhere only the GEMMs (linear) return d and the
    state updates promote them with the carried state: an RNN's h is d; a GRU's
    h' = (1-z)*n + z*h and an LSTM's c' = f*c + i*g take the state's dtype where it is wider,
    and the LSTM's h = o*tanh(c') follows c', or is d after a projection. rnnext computes in
    the parameters' dtype and only rounds its outputs (so it is at least as accurate)."""
    if (x.device.type != "cpu" or not x.is_floating_point() or x.dtype == torch.float64
            or weight.dtype == torch.float64):
        return None
    d = torch.get_autocast_dtype("cpu")
    if mode in ("RNN_TANH", "RNN_RELU"):
        return _CpuAutocast(weight.dtype, d, None)
    if mode == "GRU":
        return _CpuAutocast(weight.dtype, torch.promote_types(d, h.dtype), None)
    if onednn and _onednn_runs_lstm(x):
        return _CpuAutocast(weight.dtype, d, d)
    c_dtype = torch.promote_types(d, c.dtype)
    return _CpuAutocast(weight.dtype, d if proj else c_dtype, c_dtype)


_NO_SCRIPT = ("rnnext.{name} cannot be compiled with torch.jit.script: its forward is Python over "
              "rnnext's ops. Use torch.jit.trace (the traced graph trains and takes new shapes), "
              "torch.export.export or torch.compile; or rnnext.to_torch(model) first for TorchScript.")


class _FromTorch:
    @classmethod
    def from_torch(cls, module: nn.Module):
        """A new rnnext module with the configuration, device, dtype, training mode and weights
        of the matching torch.nn module (``rnnext.LSTM.from_torch(torch.nn.LSTM(...))``)."""
        from .utils import from_torch

        made = from_torch(module)
        if not isinstance(made, cls):
            raise TypeError(f"{cls.__name__}.from_torch got a {type(module).__name__}")
        return made

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it: fail with a
        # message that names the routes that work instead of a TorchScript parse error.
        raise RuntimeError(_NO_SCRIPT.format(name=type(self).__name__))


class RNNBase(_FromTorch, nn.Module):
    """What RNN, LSTM and GRU share: parameters, checks, input forms, layer stacking."""

    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "dropout", "bidirectional", "proj_size"]

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        # torch.nn fails on a float num_layers or proj_size with a TypeError from range() or
        # torch.empty that does not name the argument: the same type, named, here first.
        for name, value in (("num_layers", num_layers), ("proj_size", proj_size)):
            if not isinstance(value, int):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        # Every other check, message and warning is the torch.nn at hand's (they changed between
        # torch versions), so code that catches them keeps working: its own module, built on
        # the meta device, which allocates nothing.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nn.RNNBase(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                       proj_size, device="meta", dtype=dtype)
        for w in caught:  # (the dropout notice) pointing at the caller's line, as torch.nn's does
            warnings.warn(w.message, w.category, stacklevel=3)

        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        num_directions = 2 if bidirectional else 1
        gate_size = _GATES[mode] * hidden_size
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        # Creation order (and so reset_parameters' draw order) is torch.nn's: the same seed
        # gives the same initial weights.
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
                params = [("weight_ih_l{}{}", (gate_size, layer_input_size)),
                          ("weight_hh_l{}{}", (gate_size, real_hidden_size))]
                if bias:
                    params += [("bias_ih_l{}{}", (gate_size,)), ("bias_hh_l{}{}", (gate_size,))]
                if proj_size > 0:
                    params.append(("weight_hr_l{}{}", (proj_size, hidden_size)))
                suffix = "_reverse" if direction == 1 else ""
                names = []
                for pattern, shape in params:
                    name = pattern.format(layer, suffix)
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        # {name: shape} of every parameter, for the checks of every forward (_layer_weights).
        self._param_shapes = self._expected_shapes()
        self.reset_parameters()

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_param_shapes" not in self.__dict__:  # pickled by an rnnext before 2026-11-30
            self._param_shapes = self._expected_shapes()

    # ------------------------------------------------------------ torch.nn API
    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """A no-op: rnnext reads the parameters where they are (torch.nn compacts them for cuDNN)."""

    @property
    def _flat_weights(self) -> List[Optional[Tensor]]:
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # ------------------------------------------------------------ forward
    @property
    def _cell(self) -> str:
        return self.mode.lower()

    def _expected_shapes(self):
        """{parameter name: shape} as created in __init__."""
        shapes = {}
        num_directions = 2 if self.bidirectional else 1
        gate_size = _GATES[self.mode] * self.hidden_size
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else real_hidden * num_directions
            for suffix in ("", "_reverse")[:num_directions]:
                shapes[f"weight_ih_l{layer}{suffix}"] = (gate_size, layer_input)
                shapes[f"weight_hh_l{layer}{suffix}"] = (gate_size, real_hidden)
                shapes[f"bias_ih_l{layer}{suffix}"] = (gate_size,)
                shapes[f"bias_hh_l{layer}{suffix}"] = (gate_size,)
                shapes[f"weight_hr_l{layer}{suffix}"] = (self.proj_size, self.hidden_size)
        return shapes

    def _layer_weights(self) -> List[LayerWeights]:
        """The parameters per layer and direction, checked: a parameter replaced by a tensor
        of another shape, dtype or device fails here with its name, not deep in a GEMM."""
        weights = []
        first = self.weight_ih_l0
        shapes = self._param_shapes
        for names in self._all_weights:
            p = [getattr(self, n) for n in names]
            for name, w in zip(names, p):
                if not isinstance(w, Tensor):
                    raise ArgumentTypeError(f"{name} must be a Tensor, got {type(w).__name__}")
                if w.dtype != first.dtype or w.device != first.device:
                    raise RuntimeError(f"{name} has dtype {w.dtype} on {w.device}, but weight_ih_l0 "
                                       f"has dtype {first.dtype} on {first.device}; all parameters "
                                       "must share one dtype and device")
                if tuple(w.shape) != shapes[name]:
                    raise RuntimeError(f"{name} has shape {tuple(w.shape)}, expected {shapes[name]}")
            b_ih, b_hh = (p[2], p[3]) if self.bias else (None, None)
            w_hr = p[-1] if self.proj_size > 0 else None
            weights.append(LayerWeights(p[0], p[1], b_ih, b_hh, w_hr))
        return weights

    def _check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype:
            # torch.nn.LSTM checks packed input only in its kernel (RuntimeError); every other
            # path raises ValueError.
            error = RuntimeError if (self.mode == "LSTM" and batch_sizes is not None) else ValueError
            raise error(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError("input.size(-1) must be equal to input_size. "
                               f"Expected {self.input_size}, got {input.size(-1)}")
        if input.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

    def _expected_hidden_size(self, batch: int, cell_state: bool = False):
        num_directions = 2 if self.bidirectional else 1
        size = self.proj_size if (self.proj_size > 0 and not cell_state) else self.hidden_size
        return (self.num_layers * num_directions, batch, size)

    @staticmethod
    def _check_hidden_size(hx: Tensor, expected, msg: str = "Expected hidden size {}, got {}") -> None:
        if hx.size() != expected:
            raise RuntimeError(msg.format(expected, list(hx.size())))

    def _zeros(self, batch: int, like: Tensor, cell_state: bool = False) -> Tensor:
        # One zero expanded to the state's shape: nothing to fill, and autograd, which saves
        # each layer's initial state for backward, keeps 4 bytes instead of a [B, H] block.
        return like.new_zeros(()).expand(self._expected_hidden_size(batch, cell_state))

    def forward(self, input, hx=None):
        is_lstm = self.mode == "LSTM"
        kind = type(self).__name__
        if isinstance(input, PackedSequence):
            x, batch_sizes, sorted_indices, unsorted_indices = input
            is_batched, batch_dim = True, 1
            batch = int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if not isinstance(input, Tensor):
                raise ArgumentTypeError(f"{kind}: expected input as a Tensor or PackedSequence, "
                                        f"got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{kind}: Expected input to be 2D or 3D, got {input.dim()}D "
                                 + ("tensor instead" if self.mode.startswith("RNN") else "instead"))
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            x = input.transpose(0, 1) if self.batch_first else input
            batch = x.size(1)

        if hx is None:
            h0 = self._zeros(batch, x)
            c0 = self._zeros(batch, x, cell_state=True) if is_lstm else None
        else:
            h0, c0 = self._unpack_hx(hx, is_batched, packed=batch_sizes is not None)
        autocast = torch.is_autocast_enabled("cpu") and _cpu_autocast(
            self.mode, self.weight_ih_l0, x, h0, c0, onednn=batch_sizes is None and not self.proj_size,
            proj=self.proj_size > 0)
        if autocast:
            x, h0, c0 = autocast.inputs(x, h0, c0)
        self._check_input(x, batch_sizes)
        for state in (h0, c0) if is_lstm else (h0,):
            if state.dtype != x.dtype or state.device != x.device:
                raise RuntimeError(f"hx has dtype {state.dtype} on {state.device}, but the input has "
                                   f"dtype {x.dtype} on {x.device}")
        self._check_hidden_size(h0, self._expected_hidden_size(batch),
                                "Expected hidden[0] size {}, got {}" if is_lstm else
                                "Expected hidden size {}, got {}")
        if is_lstm:
            self._check_hidden_size(c0, self._expected_hidden_size(batch, cell_state=True),
                                    "Expected hidden[1] size {}, got {}")
        if is_lstm and isinstance(hx, Tensor):
            raise TypeError("LSTM expects hx as a tuple (h_0, c_0) of two tensors, got a Tensor")
        if hx is not None and sorted_indices is not None:
            h0 = _apply_permutation(h0, sorted_indices)
            c0 = _apply_permutation(c0, sorted_indices) if is_lstm else None

        y, h_n, c_n = rnn_stack(self._cell, x, batch_sizes, h0, c0, self._layer_weights(),
                                self.num_layers, self.bidirectional, self.dropout, self.training)
        if autocast:
            y, h_n, c_n = autocast.outputs(y, h_n, c_n)

        if batch_sizes is not None:
            output = PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_n = _apply_permutation(h_n, unsorted_indices)
                c_n = _apply_permutation(c_n, unsorted_indices) if is_lstm else None
        else:
            output = y.transpose(0, 1) if self.batch_first else y
            if not is_batched:
                output = output.squeeze(batch_dim)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if is_lstm else None
        return (output, (h_n, c_n)) if is_lstm else (output, h_n)

    def _unpack_hx(self, hx, is_batched: bool, packed: bool = False):
        """(h0, c0) as 3-D tensors from the hx a user passed, with torch.nn's checks."""
        dims = 3 if is_batched else 2
        form = "batched 3-D" if is_batched else "unbatched 2-D"
        if self.mode == "LSTM":
            # torch.nn's exception types: a Tensor hx is indexed as hx[0], hx[1] (IndexError
            # when its first dimension is 1), then checked as a tuple would be (RuntimeError),
            # and refused by the op (TypeError, raised in forward after the checks).
            if isinstance(hx, Tensor):
                if hx.dim() == 0 or hx.size(0) < 2:
                    raise IndexError("LSTM expects hx as a tuple (h_0, c_0) of two tensors, got a Tensor")
                hx = (hx[0], hx[1])
            if not isinstance(hx, (tuple, list)):
                raise ArgumentTypeError(f"LSTM expects hx as a tuple (h_0, c_0), got {type(hx).__name__}")
            if len(hx) < 2:
                raise IndexError(f"LSTM expects hx as a tuple (h_0, c_0) of two tensors, got {len(hx)}")
            if len(hx) > 2:
                raise RuntimeError(f"lstm expects two hidden states, got {len(hx)}")
            h0, c0 = hx
            if not isinstance(h0, Tensor) or not isinstance(c0, Tensor):
                raise ArgumentTypeError("LSTM expects hx as a tuple (h_0, c_0) of tensors")
            if packed and (h0.dim() != 3 or c0.dim() != 3):
                # torch.nn fails indexing dimension 1 of the state: an IndexError
                raise IndexError(f"With PackedSequence input, hx and cx should be 3-D but got "
                                 f"({h0.dim()}-D, {c0.dim()}-D) tensors")
            if h0.dim() != dims or c0.dim() != dims:
                raise RuntimeError(f"For {form} input, hx and cx should also be {dims}-D but got "
                                   f"({h0.dim()}-D, {c0.dim()}-D) tensors")
            return (h0, c0) if is_batched else (h0.unsqueeze(1), c0.unsqueeze(1))
        if not isinstance(hx, Tensor):
            raise ArgumentTypeError(f"{type(self).__name__} expects hx as a Tensor, got {type(hx).__name__}")
        if hx.dim() != dims:
            raise RuntimeError(f"For {form} input, hx should also be {dims}-D but got {hx.dim()}-D tensor")
        return (hx if is_batched else hx.unsqueeze(1)), None


class RNN(RNNBase):
    """Elman RNN, as torch.nn.RNN: ``RNN(input_size, hidden_size, num_layers=1,
    nonlinearity='tanh', bias=True, batch_first=False, dropout=0.0, bidirectional=False,
    device=None, dtype=None)``."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)


class LSTM(RNNBase):
    """LSTM, as torch.nn.LSTM: ``LSTM(input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None)``."""

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)


class GRU(RNNBase):
    """GRU, as torch.nn.GRU: ``GRU(input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None)``."""

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


# ---------------------------------------------------------------------------- cells
class RNNCellBase(_FromTorch, nn.Module):
    """What RNNCell, LSTMCell and GRUCell share. One step is rnnext's layer op on a 2-D
    input (the ops' one-step layout), so cells run the same kernels, forward and backward, as
    the layers."""

    __constants__ = ["input_size", "hidden_size", "bias"]
    _cell: str  # op name: "rnn_tanh", "rnn_relu", "gru", "lstm"
    _autocast_mode: str  # the layer mode whose CPU autocast dtypes the cell follows (_cpu_autocast)

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int,
                 device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def _check(self, input: Tensor, states) -> None:
        """torch.nn's cell checks and exception types (RuntimeError for sizes and dtypes) of the
        input and states; the parameters are checked by _check_parameters when the op fails."""
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} "
                               f"expected {self.input_size}")
        weight = self._parameters["weight_ih"]
        for i, state in enumerate(states):
            if input.size(0) != state.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{i} "
                                   f"batch size {state.size(0)}")
            if state.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {state.size(1)}, "
                                   f"expected {self.hidden_size}")
        for i, t in enumerate((input, *states)):
            if t.dtype != weight.dtype or t.device != weight.device:
                name = "input" if i == 0 else f"hidden{i - 1}"
                raise RuntimeError(f"{name} has dtype {t.dtype} on {t.device}, but the weights have "
                                   f"dtype {weight.dtype} on {weight.device}")

    def _check_parameters(self) -> None:
        """Each parameter's shape and dtype, with torch.nn's names: run when the op rejects a
        call, so that the error names the parameter (the op knows it as w_ih, b_hh, ...)."""
        weight = self.weight_ih
        g = GATES[self._cell]
        expected = {"weight_ih": (g * self.hidden_size, self.input_size),
                    "weight_hh": (g * self.hidden_size, self.hidden_size),
                    "bias_ih": (g * self.hidden_size,), "bias_hh": (g * self.hidden_size,)}
        for name, shape in expected.items():
            w = getattr(self, name)
            if w is not None and (tuple(w.shape) != shape or w.dtype != weight.dtype):
                raise RuntimeError(f"{name} has shape {tuple(w.shape)} and dtype {w.dtype}, "
                                   f"expected {shape} and {weight.dtype}")

    def _checked_step(self, input: Tensor, h: Tensor, c: Optional[Tensor]):
        """One step of 2-D input and states through the layer op; under CPU autocast in the
        parameters' dtype with torch.nn's output dtypes. The op checks every argument; when it
        refuses one, torch.nn's checks of the input and states (_check), then the parameters'
        (_check_parameters), raise torch.nn's message instead. (Running them only then saves
        ~2 us of a ~15 us RNNCell step.)"""
        autocast = torch.is_autocast_enabled("cpu") and _cpu_autocast(self._autocast_mode, self.weight_ih, input, h, c)
        if autocast:
            input, h, c = autocast.inputs(input, h, c)
        p = self._parameters
        w = LayerWeights(p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh"), None)
        try:
            # 2-D input is one step (a [1, B, I] view would cost ~0.7 us of a ~14 us call)
            _, h_new, c_new = layer_forward(self._cell, input, h, c, w, None, False)
        except RuntimeError:
            self._check(input, [h] if c is None else [h, c])
            self._check_parameters()  # raises with the parameter's name where one is malformed
            raise
        if autocast:
            _, h_new, c_new = autocast.outputs(h_new, h_new, c_new)
        return h_new, c_new

    def _forward_single_state(self, input, hx, name: str) -> Tensor:
        """forward of the cells whose state is one tensor h (RNNCell, GRUCell)."""
        input, is_batched = self._prepare(input, hx, name)
        if hx is not None:
            if not isinstance(hx, Tensor):
                raise ArgumentTypeError(f"{name} expects hx as a Tensor, got {type(hx).__name__}")
            if hx.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        h = (torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
             if hx is None else (hx if is_batched else hx.unsqueeze(0)))
        h_new, _ = self._checked_step(input, h, None)
        return h_new if is_batched else h_new.squeeze(0)

    def _prepare(self, input, hx, name: str):
        if not isinstance(input, Tensor):
            raise ArgumentTypeError(f"{name}: expected input as a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        is_batched = input.dim() == 2
        return (input if is_batched else input.unsqueeze(0)), is_batched



class RNNCell(RNNCellBase):
    """Elman RNN cell, as torch.nn.RNNCell: ``RNNCell(input_size, hidden_size, bias=True,
    nonlinearity='tanh', device=None, dtype=None)``."""

    __constants__ = ["input_size", "hidden_size", "bias", "nonlinearity"]
    _autocast_mode = "RNN_TANH"  # either nonlinearity

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    @property
    def _cell(self) -> str:
        if self.nonlinearity == "tanh":
            return "rnn_tanh"
        if self.nonlinearity == "relu":
            return "rnn_relu"
        raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        # An unknown nonlinearity fails in _checked_step (RuntimeError), after the input checks, as in torch.nn.
        return self._forward_single_state(input, hx, "RNNCell")


class LSTMCell(RNNCellBase):
    """LSTM cell, as torch.nn.LSTMCell: ``LSTMCell(input_size, hidden_size, bias=True,
    device=None, dtype=None)``; forward returns ``(h_1, c_1)``."""

    _cell = "lstm"
    _autocast_mode = "LSTM"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx=None):
        input, is_batched = self._prepare(input, hx, "LSTMCell")
        if hx is not None:
            if isinstance(hx, Tensor):
                # torch.nn raises TypeError here (lstm_cell(): 'hx' must be tuple of Tensors)
                raise TypeError("LSTMCell expects hx as a tuple (h_0, c_0) of tensors, got a Tensor")
            if not isinstance(hx, (tuple, list)):
                raise ArgumentTypeError(f"LSTMCell expects hx as a tuple (h_0, c_0), got {type(hx).__name__}")
            if len(hx) != 2:
                raise RuntimeError(f"lstm_cell expects two hidden states, got {len(hx)}")
            for idx, value in enumerate(hx):
                if not isinstance(value, Tensor):
                    raise ArgumentTypeError(f"LSTMCell expects hx[{idx}] to be a Tensor, got {type(value).__name__}")
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            h, c = zeros, zeros
        else:
            h, c = hx if is_batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h_new, c_new = self._checked_step(input, h, c)
        return (h_new, c_new) if is_batched else (h_new.squeeze(0), c_new.squeeze(0))


class GRUCell(RNNCellBase):
    """GRU cell, as torch.nn.GRUCell: ``GRUCell(input_size, hidden_size, bias=True,
    device=None, dtype=None)``."""

    _cell = "gru"
    _autocast_mode = "GRU"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        return self._forward_single_state(input, hx, "GRUCell")

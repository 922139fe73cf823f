"""Shared test machinery, the one copy every test file uses: build a torch.nn module (or
cell) and its rnnext twin with identical weights on a device, draw inputs, run forward and
backward under a weighted loss, and compare everything observable (outputs, final states and
the gradients of the input, of the initial states and of every parameter) within the
tolerance of the device and dtype. Also the arguments of the raw ops (torch.ops.rnnext.*).

torch.nn is the oracle throughout: nothing here compares against numbers produced by rnnext.
Random values are drawn on the CPU from fixed generators and then moved to the device, so
every device sees the same values.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, Dict, List, Optional

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnext
from rnnext.parity import half_allowance

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# Tolerances per (device type, dtype), for torch.testing.assert_close
# (|got - expected| <= atol + rtol*|expected|).
# CPU: measured max abs errors against torch.nn over every parity config (T=5, B=3, I=4, H=5,
# up to 3 layers, bidirectional, proj_size; outputs, states and all gradients): float64 7e-15
# (parameter gradients; outputs/states <= 5e-16), float32 1.9e-6 (parameter gradients;
# outputs/states <= 2.4e-7). The bounds leave one to two orders of magnitude of head room and
# still catch any real mistake: a wrong gate, a missing bias or a dropped gradient path gives
# errors of 1e-3 or more.
# CUDA: torch.nn runs cuDNN (TF32 off, see conftest.py) and rnnext its own kernels over
# cuBLAS, which sum in other orders. These are first estimates, to be tightened with the
# figures from the first GPU run.
TOL = {
    ("cpu", F64): dict(atol=1e-12, rtol=1e-12),
    ("cpu", F32): dict(atol=1e-5, rtol=1e-5),
    ("cuda", F64): dict(atol=1e-12, rtol=1e-12),
    ("cuda", F32): dict(atol=5e-5, rtol=5e-5),
}


def tolerance(device, dtype: torch.dtype) -> Dict[str, float]:
    """TOL for a device (a torch.device or a string such as "cuda:1") and dtype, as a new dict."""
    key = (torch.device(device).type, dtype)
    if key not in TOL:
        raise KeyError(f"no tolerance for {dtype} on {key[0]}")
    return dict(TOL[key])


CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
CELL_KINDS = ("RNNCell_tanh", "RNNCell_relu", "GRUCell", "LSTMCell")

# Small sizes so that the full cross product runs in seconds.
T, B, I, H = 5, 3, 4, 5


# ============================================================================ modules
def module_classes(cell: str):
    """(torch.nn class, rnnext class, extra constructor kwargs) for a sequence-module name
    (CELLS, or "RNN" for the default tanh RNN) or a cell name (CELL_KINDS)."""
    if cell in ("LSTM", "GRU", "RNN"):
        return getattr(nn, cell), getattr(rnnext, cell), {}
    if cell in ("RNN_TANH", "RNN_RELU"):
        return nn.RNN, rnnext.RNN, {"nonlinearity": cell[4:].lower()}
    if cell.startswith("RNNCell_"):
        return nn.RNNCell, rnnext.RNNCell, {"nonlinearity": cell.split("_")[1]}
    if cell in ("GRUCell", "LSTMCell"):
        return getattr(nn, cell), getattr(rnnext, cell), {}
    raise ValueError(cell)


def make_pair(cell: str, input_size: int = I, hidden_size: int = H, *, dtype=F64, seed: int = 0,
              device="cpu", via: str = "state_dict", **kwargs):
    """A torch.nn module (or cell) and an rnnext one of the same config with identical
    weights, both on `device`.

    The weights are those torch.nn draws on the CPU for `seed` (the same on every device),
    copied into rnnext through load_state_dict, which does not rely on rnnext's own
    initialisation, or through rnnext.from_torch (via="from_torch")."""
    ref_cls, our_cls, extra = module_classes(cell)
    kwargs = {**extra, **kwargs}
    torch.manual_seed(seed)
    ref = ref_cls(input_size, hidden_size, dtype=dtype, **kwargs).to(device)
    if via == "from_torch":
        ours = rnnext.from_torch(ref)
    elif via == "state_dict":
        ours = our_cls(input_size, hidden_size, dtype=dtype, device=device, **kwargs)
        ours.load_state_dict(ref.state_dict())
    else:
        raise ValueError(via)
    assert type(ours) is our_cls
    return ref, ours


def module_device(module) -> torch.device:
    return next(module.parameters()).device


def num_directions(module) -> int:
    return 2 if module.bidirectional else 1


def make_inputs(module, *, batched: bool = True, with_hx: bool = False, seq_len: int = T,
                batch: int = B, seed: int = 1):
    """x and (optionally) hx matching the module's config, in its dtype and on its device
    (drawn on the CPU, so the values are the same on every device). hx is None, a tensor,
    or an (h0, c0) tuple for LSTM. Values are drawn so that activations are not saturated."""
    dtype = module.weight_ih_l0.dtype
    device = module_device(module)
    g = torch.Generator().manual_seed(seed)
    if batched:
        shape = (batch, seq_len, module.input_size) if module.batch_first else (seq_len, batch, module.input_size)
    else:
        shape = (seq_len, module.input_size)
    x = torch.randn(shape, generator=g, dtype=dtype)
    hx = None
    if with_hx:
        layers = module.num_layers * num_directions(module)
        h_out = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
        lead = (layers, batch) if batched else (layers,)
        h0 = 0.5 * torch.randn((*lead, h_out), generator=g, dtype=dtype)
        if module.mode == "LSTM":
            c0 = 0.5 * torch.randn((*lead, module.hidden_size), generator=g, dtype=dtype)
            hx = (h0, c0)
        else:
            hx = h0
    return to_device(x, device), to_device(hx, device)


def to_device(value, device=None, dtype=None):
    """A tensor, a tuple/list of tensors, a dict of tensors or None, moved (and cast)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    return type(value)(to_device(v, device, dtype) for v in value)


# ============================================================================ the torch.nn oracle on CUDA
@contextlib.contextmanager
def cudnn_disabled():
    prev = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = prev


def torch_oracle(module, *, double_backward: bool = False):
    """The context to run a torch.nn recurrent module in when it is the oracle.

    On CUDA torch.nn takes cuDNN, which refuses backward in eval mode and double backward,
    and whose inter-layer dropout draws its own masks: for those cases torch.nn runs its
    native CUDA kernels (cuDNN off), which support both and draw dropout masks with
    at::dropout from the CUDA generator, as rnnext does. Anywhere else: nothing."""
    if not isinstance(module, nn.RNNBase) or module_device(module).type != "cuda":
        return contextlib.nullcontext()
    if double_backward or not module.training or module.dropout > 0:
        return cudnn_disabled()
    return contextlib.nullcontext()


# ============================================================================ runners
def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def loss_weights(t: torch.Tensor, g: torch.Generator, loss_dtype=None) -> torch.Tensor:
    """Random weights shaped like t, drawn on the CPU in loss_dtype (default t's dtype) and
    then moved to t's device and dtype: a half run and a float64 run given the same
    loss_dtype weight their outputs by the same values."""
    w = torch.randn(t.shape, generator=g, dtype=loss_dtype or t.dtype)
    return w.to(device=t.device, dtype=t.dtype)


def weighted_loss(outputs: List[torch.Tensor], seed: int = 1234, loss_dtype=None) -> torch.Tensor:
    """sum(o * w_o) over the outputs, each element with its own fixed random factor (the same
    for any module), so that gradient errors cannot cancel out in a plain sum."""
    g = torch.Generator().manual_seed(seed)
    return sum((o * loss_weights(o, g, loss_dtype)).sum() for o in outputs)


def _autocast(dtype, device_type: str):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def run(module, x, hx=None, *, loss_seed: int = 1234, loss_dtype=None,
        autocast_dtype=None) -> Dict[str, Optional[torch.Tensor]]:
    """Forward and backward of a sequence module on fresh leaf copies of x and hx.

    The loss is weighted_loss of the output and of the final states. Returns the results and
    every gradient, keyed by name: 'out', 'h_n', 'c_n', 'grad_x', 'grad_h0', 'grad_c0', and
    'param.<name>' per parameter. autocast_dtype runs the forward under
    torch.autocast(x's device type, dtype=autocast_dtype) (and the backward outside it)."""
    is_lstm = module.mode == "LSTM"
    module.zero_grad(set_to_none=True)
    x = leaf(x)
    h0 = c0 = None
    call_hx = None
    if hx is not None:
        if is_lstm:
            h0, c0 = leaf(hx[0]), leaf(hx[1])
            call_hx = (h0, c0)
        else:
            h0 = leaf(hx)
            call_hx = h0
    with torch_oracle(module):
        with _autocast(autocast_dtype, x.device.type):
            y, state = module(x, call_hx)
        h_n, c_n = state if is_lstm else (state, None)
        weighted_loss([y, h_n] + ([c_n] if is_lstm else []), loss_seed, loss_dtype).backward()

    res: Dict[str, Optional[torch.Tensor]] = {
        "out": y.detach(), "h_n": h_n.detach(), "c_n": None if c_n is None else c_n.detach(),
        "grad_x": x.grad,
        "grad_h0": None if h0 is None else h0.grad,
        "grad_c0": None if c0 is None else c0.grad,
    }
    for name, p in module.named_parameters():
        res["param." + name] = p.grad
    return res


def run_packed(module, x, lengths, hx, enforce_sorted, loss_seed=7, loss_dtype=None, autocast_dtype=None):
    """Forward on pack_padded_sequence(x) and backward of a loss weighting every valid output
    element and every final-state element differently; returns results and gradients.
    batch_sizes stays on the CPU whatever x's device, as torch makes it. autocast_dtype: the
    forward runs under torch.autocast as in run()."""
    is_lstm = module.mode == "LSTM"
    module.zero_grad(set_to_none=True)
    x = leaf(x)
    leaves = []
    call_hx = None
    if hx is not None:
        leaves = [leaf(t) for t in (hx if is_lstm else (hx,))]
        call_hx = tuple(leaves) if is_lstm else leaves[0]
    packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=enforce_sorted)
    assert packed.batch_sizes.device.type == "cpu"
    with torch_oracle(module):
        with _autocast(autocast_dtype, x.device.type):
            out, state = module(packed, call_hx)
        assert isinstance(out, PackedSequence)
        padded, out_lengths = pad_packed_sequence(out, batch_first=module.batch_first)
        assert out_lengths.tolist() == list(lengths)
        states = list(state) if is_lstm else [state]
        weighted_loss([padded] + states, loss_seed, loss_dtype).backward()
    res = {"out": padded.detach(), "grad_x": x.grad}
    for i, s in enumerate(states):
        res[f"state{i}"] = s.detach()
    for i, t in enumerate(leaves):
        res[f"grad_hx{i}"] = t.grad
    for name, p in module.named_parameters():
        res["param." + name] = p.grad
    return res


def as_list(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def run_cell(cell, x, hx, *, loss_seed: int = 1234, loss_dtype=None,
             autocast_dtype=None) -> Dict[str, Optional[torch.Tensor]]:
    """One step of an RNNCell/GRUCell/LSTMCell with fresh leaves; returns 'out0' (and 'out1'
    for LSTMCell), 'grad_x', 'grad_hx<i>' per state and 'param.<name>' per parameter.
    autocast_dtype: the step runs under torch.autocast as in run()."""
    cell.zero_grad(set_to_none=True)
    x = leaf(x)
    states = None if hx is None else [leaf(t) for t in as_list(hx)]
    call_hx = None if states is None else (tuple(states) if len(states) == 2 else states[0])
    with _autocast(autocast_dtype, x.device.type):
        outs = as_list(cell(x, call_hx))
    weighted_loss(outs, loss_seed, loss_dtype).backward()
    res: Dict[str, Optional[torch.Tensor]] = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    res["grad_x"] = x.grad
    for i, s in enumerate(states or []):
        res[f"grad_hx{i}"] = s.grad
    for name, p in cell.named_parameters():
        res[f"param.{name}"] = p.grad
    return res


# ============================================================================ float16 / bfloat16
HALF = [pytest.param(F16, id="float16"), pytest.param(BF16, id="bfloat16")]
# Sequence-module configurations of the half-precision and CUDA tests.
MODULE_CONFIGS = [
    pytest.param("LSTM", {}, id="LSTM"),
    pytest.param("LSTM", dict(proj_size=6), id="LSTM-proj"),
    pytest.param("GRU", {}, id="GRU"),
    pytest.param("RNN_TANH", {}, id="RNN_TANH"),
    pytest.param("RNN_RELU", {}, id="RNN_RELU"),
]


def half_twins(ref64_cpu, device, dtype):
    """torch.nn and rnnext in `dtype` on `device`, and the float64 CPU oracle holding exactly
    their (rounded) weights."""
    ref_h = copy.deepcopy(ref64_cpu).to(device=device, dtype=dtype)
    ours_h = rnnext.from_torch(ref_h)
    oracle = copy.deepcopy(ref_h).to(device="cpu", dtype=F64)
    return ref_h, ours_h, oracle


def rounded(value, dtype):
    """float64 values that `dtype` represents exactly (so every run sees the same inputs)."""
    return to_device(to_device(value, dtype=dtype), dtype=F64)


def assert_half_within(expected, torch_res, our_res, dtype, device, what: str) -> None:
    """rnnext's error against the reference `expected` (float64, or float32 for autocast) is
    at most parity.half_allowance(device, dtype, torch.nn's error) x max(1, max|ref|) for every
    output, state and gradient, each in the dtype and on the device torch.nn's has."""
    assert set(our_res) == set(expected) == set(torch_res), what
    for key, ref in expected.items():
        got, theirs = our_res[key], torch_res[key]
        if ref is None:
            assert got is None, f"{what}: {key} should be None (as in torch.nn)"
            continue
        assert got is not None, f"{what}: {key} is missing"
        assert got.dtype == theirs.dtype and got.device.type == torch.device(device).type, \
            f"{what}: {key} is {got.dtype} on {got.device}; torch.nn's is {theirs.dtype}"
        assert got.shape == ref.shape, f"{what}: {key} shape {tuple(got.shape)} != {tuple(ref.shape)}"
        if ref.numel() == 0:
            continue
        scale = max(1.0, ref.abs().max().item())
        err_ours = (got.cpu().to(F64) - ref.cpu().to(F64)).abs().max().item() / scale
        err_torch = (theirs.cpu().to(F64) - ref.cpu().to(F64)).abs().max().item() / scale
        bound = half_allowance(device, dtype, err_torch)
        assert err_ours <= bound, (
            f"{what}: {key}: rnnext's scaled error {err_ours:.3e} > {bound:.3e} "
            f"(torch.nn's {err_torch:.3e}, max|ref| {scale:.3g})")


# ============================================================================ comparisons
def max_errors(ref_res, our_res) -> Dict[str, float]:
    """Max abs difference per key (keys where both are None are skipped)."""
    out = {}
    for key in ref_res:
        a, b = ref_res[key], our_res.get(key)
        if a is None and b is None:
            continue
        out[key] = float("inf") if (a is None or b is None or a.shape != b.shape) else (a - b).abs().max().item()
    return out


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor, what: str = "", *, tol=None) -> None:
    """|got - expected| <= atol * max(1, |expected|) element by element (atol from
    tolerance() for expected's device and dtype unless tol is given); same shape, dtype and
    device."""
    assert got is not None, f"{what}: missing (expected shape {tuple(expected.shape)})"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.device == expected.device, f"{what}: device {got.device} != {expected.device}"
    if expected.numel() == 0:
        return
    atol = (tol or tolerance(expected.device, expected.dtype))["atol"]
    bound = atol * expected.abs().clamp(min=1.0)
    err = (got - expected).abs()
    worst = (err / bound).max().item()
    assert bool((err <= bound).all()), (
        f"{what}: max abs error {err.max().item():.3e} exceeds the bound "
        f"({atol:.0e} * max(1, |ref|)) by a factor {worst:.2f}")


def assert_results_close(ref_res, our_res, what: str = "", *, scale_atol: bool = False,
                         per_element: bool = False, tol=None) -> None:
    """Every key matches (same keys, None where torch.nn has None, same dtype and device),
    within tolerance() for the expected tensor's device and dtype (or tol).

    scale_atol multiplies the absolute tolerance by max(1, max|expected|) per tensor, for sizes
    where sums of many O(1) terms make large gradients (float32 rounding then exceeds a fixed
    1e-5). per_element bounds each element by atol * max(1, |expected|) instead."""
    assert set(ref_res) == set(our_res), f"{what}: different keys {set(ref_res) ^ set(our_res)}"
    for key, expected in ref_res.items():
        got = our_res[key]
        if expected is None:
            assert got is None, f"{what}: {key} should be None (as in torch.nn), got a tensor"
            continue
        assert got is not None, f"{what}: {key} is None, expected a tensor of shape {tuple(expected.shape)}"
        if per_element:
            assert_close_scaled(got, expected, f"{what}: {key}", tol=tol)
            continue
        assert got.dtype == expected.dtype, f"{what}: {key} dtype {got.dtype} != {expected.dtype}"
        t = dict(tol) if tol is not None else tolerance(expected.device, expected.dtype)
        if scale_atol:
            t["atol"] *= max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(got, expected, **t, msg=lambda m: f"{what}: {key}: {m}")


def assert_results_equal(first, second, what: str = "") -> None:
    """The same keys, None in the same places, and the same bits everywhere else."""
    assert set(first) == set(second), f"{what}: different keys {set(first) ^ set(second)}"
    for key, a in first.items():
        b = second[key]
        if a is None or b is None:
            assert a is None and b is None, f"{what}: {key} is None in only one result"
            continue
        assert a.dtype == b.dtype and a.device == b.device, f"{what}: {key}: {a.dtype}/{a.device} vs {b.dtype}/{b.device}"
        assert torch.equal(a, b), f"{what}: {key} differs, max abs difference {(a - b).abs().max().item():.3e}"


def check_parity(ref, ours, x, hx=None):
    """Runs both modules and asserts everything matches; returns the per-key max errors."""
    ref_res = run(ref, x, hx)
    our_res = run(ours, x, hx)
    # A sanity check of the oracle itself: the gradients that must exist do exist.
    assert ref_res["grad_x"] is not None
    assert_results_close(ref_res, our_res, what=f"{type(ours).__name__}({ours.extra_repr()})")
    return max_errors(ref_res, our_res)


def raised(fn: Callable[[], object]) -> Optional[BaseException]:
    """The exception fn raises (warnings silenced), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except Exception as exc:  # noqa: BLE001 - any exception type is what is under test
        return exc
    return None


# ============================================================================ raw ops
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
OP_CELLS = tuple(GATES)


def forward_op(cell: str):
    return getattr(torch.ops.rnnext, f"{cell}_layer_forward").default


def backward_op(cell: str):
    return getattr(torch.ops.rnnext, f"{cell}_layer_backward").default


def op_args(cell: str, *, bias: bool = True, reverse: bool = False, proj: bool = False,
            requires_grad: bool = True, seed: int = 0, dtype=F64, device="cpu", batch_sizes=None,
            steps: int = 3, batch: int = 2, input_size: int = 3, hidden_size: int = 4,
            proj_size: int = 2, scale: float = 0.5, one_step: bool = False):
    """Forward-op arguments in schema order (without need_backward), drawn on the CPU in
    float64 (values scale * N(0, 1), so no activation saturates at 0.5), then cast to dtype
    and moved to device. x is [steps, batch, input_size], [batch, input_size] (one step)
    with one_step, or packed [sum(batch_sizes), input_size] when batch_sizes is given;
    batch_sizes stays on the CPU."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        t = (scale * torch.randn(*shape, generator=g, dtype=F64)).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    if batch_sizes is not None:
        batch_sizes = torch.as_tensor(batch_sizes, dtype=torch.int64)
        batch = int(batch_sizes[0])
        x = r(int(batch_sizes.sum()), input_size)
    else:
        x = r(batch, input_size) if one_step else r(steps, batch, input_size)
    hout = proj_size if proj else hidden_size
    gh = GATES[cell] * hidden_size
    h0 = r(batch, hout)
    w_ih, w_hh = r(gh, input_size), r(gh, hout)
    b_ih, b_hh = (r(gh), r(gh)) if bias else (None, None)
    if cell == "lstm":
        c0 = r(batch, hidden_size)
        w_hr = r(proj_size, hidden_size) if proj else None
        return (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    return (x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)


def backward_args(cell: str, **kwargs):
    """Backward-op arguments in schema order (without the need_grad flags): the saved values
    of a forward-op call on op_args(cell, **kwargs) and random output gradients."""
    fwd = op_args(cell, **{**kwargs, "requires_grad": False})
    outs = forward_op(cell)(*fwd)
    g = torch.Generator().manual_seed(5)

    def r(t):
        return torch.randn(t.shape, generator=g, dtype=F64).to(device=t.device, dtype=t.dtype)

    bias = fwd[5 if cell == "lstm" else 4] is not None
    if cell == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, rev = fwd
        y, h_n, c_n, ws = outs
        return (r(y), r(h_n), r(c_n), x, w_ih, w_hh, w_hr, batch_sizes, rev, bias, y, ws, h0, c0)
    x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, rev = fwd
    y, h_n, ws = outs
    return (r(y), r(h_n), x, w_ih, w_hh, batch_sizes, rev, bias, y, ws, h0)


def torch_layer_grads(cell: str, fwd, grad_y, grad_h_n, grad_c_n=None):
    """The gradients a backward op returns for the forward-op arguments `fwd` (op_args, padded,
    one layer, one direction) and output gradients, computed by torch.nn with the same weights
    through autograd: [grad_x, grad_h0, (grad_c0,) grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh,
    (grad_w_hr)], a missing bias or projection as an empty [0]. reverse: torch.nn runs the
    time-flipped sequence."""
    if cell == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = fwd
    else:
        (x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse), c0, w_hr = fwd, None, None
    assert batch_sizes is None, "padded sequences only"
    bias = b_ih is not None
    hidden = w_hh.shape[0] // GATES[cell]
    kwargs = dict(bias=bias, dtype=x.dtype, device=x.device)
    if cell == "lstm":
        module = nn.LSTM(x.shape[-1], hidden, proj_size=w_hr.shape[0] if w_hr is not None else 0, **kwargs)
    elif cell == "gru":
        module = nn.GRU(x.shape[-1], hidden, **kwargs)
    else:
        module = nn.RNN(x.shape[-1], hidden, nonlinearity=cell[4:], **kwargs)
    params = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh,
              "weight_hr_l0": w_hr}
    with torch.no_grad():
        for name, value in params.items():
            if value is not None:
                getattr(module, name).copy_(value)
    flip = (lambda t: t.flip(0)) if reverse else (lambda t: t)
    xx = x.detach().clone().requires_grad_(True)
    states = [h0.detach().clone().requires_grad_(True)] + ([c0.detach().clone().requires_grad_(True)] if c0 is not None else [])
    hx = (states[0][None], states[1][None]) if cell == "lstm" else states[0][None]
    y, state_n = module(flip(xx), hx)
    outputs = [flip(y)] + ([state_n[0][0], state_n[1][0]] if cell == "lstm" else [state_n[0]])
    grads_out = [grad_y, grad_h_n] + ([grad_c_n] if cell == "lstm" else [])
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"] + (["weight_hr_l0"] if cell == "lstm" else [])
    present = [getattr(module, n) for n in names if params[n] is not None]
    got = torch.autograd.grad(outputs, [xx, *states, *present], grads_out)
    grads = list(got[:1 + len(states)])
    rest = iter(got[1 + len(states):])
    empty = x.new_empty(0)
    grads += [next(rest) if params[n] is not None else empty for n in names]
    return grads


def require_gemm_route(route: str) -> None:
    """Skips the test, naming the reason (absent hardware), where this CPU lacks the per-step
    GEMM route ("avx512", "avx2"; "blas" is always there)."""
    import pytest
    try:
        torch.ops.rnnext._step_gemm(torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, 1), route, False)
    except ValueError:
        pytest.skip(f"this CPU has no {route} (absent hardware)")


@contextlib.contextmanager
def cpu_option(name: str, value: str):
    """Sets a CPU tuning option (csrc/cpu/options.h, rnnext._C.cpu_option) for the block, and
    restores it after."""
    from rnnext import _C
    before = _C.cpu_option(name)
    _C.cpu_option(name, value)
    try:
        yield
    finally:
        _C.cpu_option(name, before)

"""Shared test machinery: build a torch.nn module and its rnnext twin with identical weights,
run both on the same inputs and compare everything observable (outputs, final states and the
gradients of the input, of the initial states and of every parameter).

torch.nn is the oracle throughout: nothing here compares against numbers produced by rnnext.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnext

# Tolerances per dtype, for torch.testing.assert_close (|got - expected| <= atol + rtol*|expected|).
# Measured max abs errors against torch.nn over every parity config (T=5, B=3, I=4, H=5, up to
# 3 layers, bidirectional, proj_size; outputs, states and all gradients): float64 7e-15
# (parameter gradients; outputs/states <= 5e-16), float32 1.9e-6 (parameter gradients;
# outputs/states <= 2.4e-7). The bounds leave one to two orders of magnitude of head room and
# still catch any real mistake: a wrong gate, a missing bias or a dropped gradient path gives
# errors of 1e-3 or more.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}

CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")

# Small sizes so that the full cross product runs in seconds.
T, B, I, H = 5, 3, 4, 5


def module_classes(cell: str):
    """(torch.nn class, rnnext class, extra constructor kwargs) for a cell name."""
    if cell == "LSTM":
        return nn.LSTM, rnnext.LSTM, {}
    if cell == "GRU":
        return nn.GRU, rnnext.GRU, {}
    if cell == "RNN_TANH":
        return nn.RNN, rnnext.RNN, {"nonlinearity": "tanh"}
    if cell == "RNN_RELU":
        return nn.RNN, rnnext.RNN, {"nonlinearity": "relu"}
    raise ValueError(cell)


def make_pair(cell: str, input_size: int = I, hidden_size: int = H, *, dtype=torch.float64,
              seed: int = 0, **kwargs):
    """A torch.nn module and an rnnext module of the same config with identical weights.

    The weights are those torch.nn draws for `seed`, copied into rnnext through
    load_state_dict (so this does not rely on rnnext's own initialisation)."""
    ref_cls, our_cls, extra = module_classes(cell)
    kwargs = {**extra, **kwargs}
    torch.manual_seed(seed)
    ref = ref_cls(input_size, hidden_size, dtype=dtype, **kwargs)
    ours = our_cls(input_size, hidden_size, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def num_directions(module) -> int:
    return 2 if module.bidirectional else 1


def make_inputs(module, *, batched: bool = True, with_hx: bool = False, seq_len: int = T,
                batch: int = B, seed: int = 1):
    """x and (optionally) hx matching the module's config, in its dtype. hx is None, a tensor,
    or an (h0, c0) tuple for LSTM. Values are drawn so that activations are not saturated."""
    dtype = module.weight_ih_l0.dtype
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
    return x, hx


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _split(out, is_lstm):
    y, state = out
    if is_lstm:
        h_n, c_n = state
    else:
        h_n, c_n = state, None
    return y, h_n, c_n


def run(module, x, hx=None, *, loss_seed: int = 1234) -> Dict[str, Optional[torch.Tensor]]:
    """Forward and backward of `module` on fresh leaf copies of x and hx.

    The loss weights every element of the output and of the final states by its own fixed
    random factor (the same for any module, drawn from `loss_seed`), so that gradient errors
    cannot cancel out in a plain sum. Returns the results and every gradient, keyed by name:
    'out', 'h_n', 'c_n', 'grad_x', 'grad_h0', 'grad_c0', and 'param.<name>' per parameter."""
    is_lstm = module.mode == "LSTM"
    module.zero_grad(set_to_none=True)
    x = _leaf(x)
    h0 = c0 = None
    call_hx = None
    if hx is not None:
        if is_lstm:
            h0, c0 = _leaf(hx[0]), _leaf(hx[1])
            call_hx = (h0, c0)
        else:
            h0 = _leaf(hx)
            call_hx = h0
    y, h_n, c_n = _split(module(x, call_hx), is_lstm)

    g = torch.Generator().manual_seed(loss_seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss = loss + (h_n * torch.randn(h_n.shape, generator=g, dtype=h_n.dtype)).sum()
    if c_n is not None:
        loss = loss + (c_n * torch.randn(c_n.shape, generator=g, dtype=c_n.dtype)).sum()
    loss.backward()

    res: Dict[str, Optional[torch.Tensor]] = {
        "out": y.detach(), "h_n": h_n.detach(), "c_n": None if c_n is None else c_n.detach(),
        "grad_x": x.grad,
        "grad_h0": None if h0 is None else h0.grad,
        "grad_c0": None if c0 is None else c0.grad,
    }
    for name, p in module.named_parameters():
        res["param." + name] = p.grad
    return res


def run_packed(module, x, lengths, hx, enforce_sorted, loss_seed=7):
    """Forward on pack_padded_sequence(x) and backward of a loss weighting every valid output
    element and every final-state element differently; returns results and gradients."""
    is_lstm = module.mode == "LSTM"
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    leaves = []
    call_hx = None
    if hx is not None:
        leaves = [t.detach().clone().requires_grad_(True) for t in (hx if is_lstm else (hx,))]
        call_hx = tuple(leaves) if is_lstm else leaves[0]
    packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=enforce_sorted)
    out, state = module(packed, call_hx)
    assert isinstance(out, PackedSequence)
    padded, out_lengths = pad_packed_sequence(out, batch_first=module.batch_first)
    assert out_lengths.tolist() == list(lengths)
    states = list(state) if is_lstm else [state]
    g = torch.Generator().manual_seed(loss_seed)
    loss = (padded * torch.randn(padded.shape, generator=g, dtype=padded.dtype)).sum()
    for s in states:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    loss.backward()
    res = {"out": padded.detach(), "grad_x": x.grad}
    for i, s in enumerate(states):
        res[f"state{i}"] = s.detach()
    for i, leaf in enumerate(leaves):
        res[f"grad_hx{i}"] = leaf.grad
    for name, p in module.named_parameters():
        res["param." + name] = p.grad
    return res


def max_errors(ref_res, our_res) -> Dict[str, float]:
    """Max abs difference per key (keys where both are None are skipped)."""
    out = {}
    for key in ref_res:
        a, b = ref_res[key], our_res.get(key)
        if a is None and b is None:
            continue
        out[key] = float("inf") if (a is None or b is None or a.shape != b.shape) else (a - b).abs().max().item()
    return out


def assert_results_close(ref_res, our_res, dtype, what: str = "", *, scale_atol: bool = False) -> None:
    """Every key matches within TOL[dtype]. scale_atol multiplies the absolute tolerance by
    max(1, max|expected|) per tensor, for sizes where sums of many O(1) terms make large
    gradients (float32 rounding then exceeds a fixed 1e-5)."""
    assert set(ref_res) == set(our_res), f"{what}: different keys {set(ref_res) ^ set(our_res)}"
    for key, expected in ref_res.items():
        got = our_res[key]
        if expected is None:
            assert got is None, f"{what}: {key} should be None, got a tensor"
            continue
        assert got is not None, f"{what}: {key} is None, expected a tensor of shape {tuple(expected.shape)}"
        assert got.dtype == expected.dtype, f"{what}: {key} dtype {got.dtype} != {expected.dtype}"
        tol = dict(TOL[dtype])
        if scale_atol:
            tol["atol"] *= max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{what}: {key}: {m}")


def check_parity(ref, ours, x, hx=None):
    """Runs both modules and asserts everything matches; returns the per-key max errors."""
    dtype = ref.weight_ih_l0.dtype
    ref_res = run(ref, x, hx)
    our_res = run(ours, x, hx)
    # A sanity check of the oracle itself: the gradients that must exist do exist.
    assert ref_res["grad_x"] is not None
    assert_results_close(ref_res, our_res, dtype, what=f"{type(ours).__name__}({ours.extra_repr()})")
    return max_errors(ref_res, our_res)

"""rnnext.RNNCell / LSTMCell / GRUCell against torch.nn's cells with the same weights.

torch.nn is the oracle throughout: outputs and the gradients of the input, of the states and
of every parameter, under a loss that weights every output element by its own fixed random
factor (so that gradient errors cannot cancel in a plain sum).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call
from torch.profiler import ProfilerActivity, profile

import rnnext

from helpers import (CELL_KINDS as KINDS, F32, F64, as_list, assert_close_scaled, assert_results_close,
                     leaf, make_pair, module_classes, run_cell, weighted_loss)

I, H, B = 4, 5, 3

# torch.nn's fused cell ops: none of them may run inside an rnnext cell.
TORCH_CELL_OPS = ("aten::lstm_cell", "aten::gru_cell", "aten::rnn_tanh_cell", "aten::rnn_relu_cell",
                  "aten::_thnn_fused_lstm_cell", "aten::_thnn_fused_gru_cell")
OP_NAME = {"RNNCell_tanh": "rnn_tanh", "RNNCell_relu": "rnn_relu", "GRUCell": "gru", "LSTMCell": "lstm"}


# ============================================================================ helpers
def random_state(kind: str, lead, dtype, gen: torch.Generator, hidden_size: int = H, device="cpu"):
    """hx (a tensor, or (h, c) for LSTMCell) drawn on the CPU from gen, moved to device."""
    h = 0.5 * torch.randn(*lead, hidden_size, generator=gen, dtype=dtype)
    if kind == "LSTMCell":
        return h.to(device), (0.5 * torch.randn(*lead, hidden_size, generator=gen, dtype=dtype)).to(device)
    return h.to(device)


def assert_results_match(ref_res, our_res, what: str = "") -> None:
    """|ours - ref| <= atol * max(1, |ref|) element by element (helpers.TOL for the device and
    dtype), every key, None where torch.nn has None."""
    assert_results_close(ref_res, our_res, what, per_element=True)


# ============================================================================ one-step parity
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("kind", KINDS)
def test_cell_parity(kind, batched, with_hx, bias, dtype, device):
    ref, ours = make_pair(kind, dtype=dtype, bias=bias, via="state_dict" if dtype == F64 else "from_torch",
                          device=device)
    g = torch.Generator().manual_seed(7)
    lead = (B,) if batched else ()
    x = torch.randn(*lead, I, generator=g, dtype=dtype).to(device)
    hx = random_state(kind, lead, dtype, g, device=device) if with_hx else None
    ref_res = run_cell(ref, x, hx)
    our_res = run_cell(ours, x, hx)
    # the oracle itself: the gradients that must exist do exist, and are not all zero
    assert ref_res["grad_x"] is not None and ref_res["grad_x"].abs().sum() > 0
    assert ref_res["out0"].shape == ((B, H) if batched else (H,))
    assert_results_match(ref_res, our_res, what=f"{kind} batched={batched} hx={with_hx} bias={bias}")


@pytest.mark.parametrize("kind", KINDS)
def test_cell_parity_larger_sizes_and_saturation(kind, device):
    """Bigger sizes (several parallel row blocks) and large inputs that saturate the gates."""
    ref, ours = make_pair(kind, 24, 40, dtype=F64, seed=3, device=device)
    g = torch.Generator().manual_seed(11)
    x = (4.0 * torch.randn(65, 24, generator=g, dtype=F64)).to(device)
    hx = random_state(kind, (65,), F64, g, hidden_size=40, device=device)
    assert_results_match(run_cell(ref, x, hx), run_cell(ours, x, hx), what=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_cell_output_does_not_alias_or_modify_inputs(kind, device):
    ref, ours = make_pair(kind, dtype=F64, device=device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, I, generator=g, dtype=F64).to(device)
    hx = random_state(kind, (B,), F64, g, device=device)
    saved = [t.clone() for t in [x, *as_list(hx)]]
    outs = as_list(ours(x, hx))
    assert all(torch.equal(a, b) for a, b in zip(saved, [x, *as_list(hx)])), "inputs were modified"
    for o in outs:
        assert all(o.data_ptr() != t.data_ptr() for t in [x, *as_list(hx)])
    for o, e in zip(outs, as_list(ref(x, hx))):
        assert_close_scaled(o.detach(), e.detach())


# ============================================================================ module API
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_parameters_and_repr_match_torch(kind, bias):
    ref_cls, our_cls, extra = module_classes(kind)
    ref = ref_cls(I, H, bias=bias, **extra)
    ours = our_cls(I, H, bias=bias, **extra)
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in ref.named_parameters()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)
    for attr in ("input_size", "hidden_size", "bias"):
        assert getattr(ours, attr) == getattr(ref, attr)
    if kind.startswith("RNNCell"):
        assert ours.nonlinearity == ref.nonlinearity
    if not bias:
        assert ours.bias_ih is None and ours.bias_hh is None
    assert all(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_same_initial_weights(kind, dtype, device):
    """Constructed on the device: the weights come from that device's generator."""
    ref_cls, our_cls, extra = module_classes(kind)
    torch.manual_seed(42)
    ref = ref_cls(I, H, dtype=dtype, device=device, **extra)
    after_ref = torch.rand(1, device=device)
    torch.manual_seed(42)
    ours = our_cls(I, H, dtype=dtype, device=device, **extra)
    after_ours = torch.rand(1, device=device)
    for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert q.dtype == dtype and q.device == p.device
        assert torch.equal(p, q), f"{name} differs"
    bound = 1.0 / math.sqrt(H)
    assert all(p.abs().max() <= bound for p in ours.parameters())
    assert torch.equal(after_ref, after_ours), "the RNG advanced differently"


@pytest.mark.parametrize("kind", KINDS)
def test_from_torch_copies_config_and_weights(kind, device):
    ref_cls, our_cls, extra = module_classes(kind)
    ref = ref_cls(I, H, bias=False, dtype=F64, device=device, **extra)
    ours = rnnext.from_torch(ref)
    assert type(ours) is our_cls and repr(ours) == repr(ref)
    for (n, p), (m, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n == m and q.dtype == F64 and q.device == p.device and torch.equal(p, q)
        assert q.data_ptr() != p.data_ptr(), "from_torch must copy, not share, the weights"


# ============================================================================ runs rnnext's ops
def _profiled_names(fn) -> set:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("kind", KINDS)
def test_cells_run_rnnext_ops_not_torch_cells(kind, device):
    ref, ours = make_pair(kind, dtype=F32, device=device)
    x = torch.randn(B, I).to(device).requires_grad_()

    def step(cell):
        return lambda: weighted_loss(as_list(cell(x))).backward()

    ref_names = _profiled_names(step(ref))
    # the profiler does see torch.nn's fused cell op (so its absence below means something)
    assert any(n in ref_names for n in TORCH_CELL_OPS), sorted(ref_names)
    names = _profiled_names(step(ours))
    op = OP_NAME[kind]
    assert f"rnnext::{op}_layer_forward" in names, sorted(names)
    assert f"rnnext::{op}_layer_backward" in names, sorted(names)
    assert not any(n in names for n in TORCH_CELL_OPS), sorted(n for n in names if "cell" in n)


# ============================================================================ multi-step loops
def _loop(cell, kind, xs, hx, steps):
    """Runs the cell over xs[t], feeding h (and c) back; returns every h_t (and the last c)."""
    outs = []
    state = hx
    for t in range(steps):
        state = cell(xs[t], state)
        outs.append(state[0] if kind == "LSTMCell" else state)
    if kind == "LSTMCell":
        outs.append(state[1])
    return outs


def _run_loop(cell, kind, xs, hx, steps):
    cell.zero_grad(set_to_none=True)
    xs = leaf(xs)
    states = [leaf(t) for t in as_list(hx)]
    call_hx = tuple(states) if kind == "LSTMCell" else states[0]
    outs = _loop(cell, kind, xs, call_hx, steps)
    weighted_loss(outs, seed=77).backward()
    res = {f"h{t}": o.detach() for t, o in enumerate(outs)}
    res["grad_x"] = xs.grad
    for i, s in enumerate(states):
        res[f"grad_hx{i}"] = s.grad
    for name, p in cell.named_parameters():
        res[f"param.{name}"] = p.grad
    return res


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", KINDS)
def test_ten_step_loop_matches_torch(kind, dtype, device):
    steps = 10
    ref, ours = make_pair(kind, dtype=dtype, via="from_torch", seed=2, device=device)
    g = torch.Generator().manual_seed(8)
    xs = torch.randn(steps, B, I, generator=g, dtype=dtype).to(device)
    hx = random_state(kind, (B,), dtype, g, device=device)
    ref_res = _run_loop(ref, kind, xs, hx, steps)
    our_res = _run_loop(ours, kind, xs, hx, steps)
    # the gradient reaches the first step through all ten
    assert ref_res["grad_x"][0].abs().sum() > 0
    assert_results_match(ref_res, our_res, what=f"{kind} loop")


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_loop_matches_torch(kind, device):
    steps = 10
    ref, ours = make_pair(kind, dtype=F64, seed=4, device=device)
    g = torch.Generator().manual_seed(9)
    xs = torch.randn(steps, I, generator=g, dtype=F64).to(device)
    hx = random_state(kind, (), F64, g, device=device)
    assert_results_match(_run_loop(ref, kind, xs, hx, steps), _run_loop(ours, kind, xs, hx, steps),
                         what=f"{kind} unbatched loop")


# ============================================================================ gradcheck
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_inputs_states_and_parameters(kind, bias, device):
    _, ours = make_pair(kind, 3, 2, dtype=F64, bias=bias, seed=6, device=device)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, generator=g, dtype=F64).to(device)
    states = as_list(random_state(kind, (2,), F64, g, hidden_size=2, device=device))
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone() for _, p in ours.named_parameters()]
    n_states = len(states)
    if kind == "RNNCell_relu":
        # keep the pre-activations away from relu's kink, where finite differences are wrong
        x = x.abs() + 0.5
        params = [p.abs() + 0.1 for p in params]
        states = [s.abs() for s in states]

    def fn(x, *rest):
        st, ps = rest[:n_states], rest[n_states:]
        hx = tuple(st) if n_states == 2 else st[0]
        return functional_call(ours, dict(zip(names, ps)), (x, hx))

    inputs = tuple(t.requires_grad_(True) for t in [x, *states, *params])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ============================================================================ batch size 0 and sizes
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_zero_matches_torch(kind, with_hx, device):
    ref, ours = make_pair(kind, dtype=F64, device=device)
    x = torch.randn(0, I, dtype=F64).to(device)
    hx = random_state(kind, (0,), F64, torch.Generator().manual_seed(0), device=device) if with_hx else None
    ref_res = run_cell(ref, x, hx)
    our_res = run_cell(ours, x, hx)
    assert ref_res["out0"].shape == (0, H)
    assert_results_match(ref_res, our_res, what=f"{kind} batch 0")
    for name, _ in ours.named_parameters():
        assert torch.count_nonzero(our_res[f"param.{name}"]) == 0


@pytest.mark.parametrize("sizes", [(0, H), (I, 0)], ids=["input_size0", "hidden_size0"])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_feature_sizes_match_torch(kind, sizes, device):
    """torch.nn's cells accept input_size=0 and hidden_size=0 (empty weights)."""
    input_size, hidden_size = sizes
    ref, ours = make_pair(kind, input_size, hidden_size, dtype=F64, device=device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, input_size, generator=g, dtype=F64).to(device)
    hx = random_state(kind, (B,), F64, g, hidden_size=hidden_size, device=device)
    assert_results_match(run_cell(ref, x, hx), run_cell(ours, x, hx), what=f"{kind} sizes {sizes}")

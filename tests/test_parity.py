"""Numerical parity with torch.nn: outputs, final states and every gradient (input, initial
states, parameters), for every cell type and module configuration, plus weight interchange
(same-seed initialisation, state_dict, copy_parameters, from_torch). Every test runs on the
CPU and on CUDA (the `device` fixture, conftest.py), against torch.nn on the same device."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import rnnext
from helpers import (B, CELLS, H, I, T, assert_results_close, check_parity, make_inputs, make_pair,
                     module_classes, run, tolerance, torch_oracle, weighted_loss)

F64, F32 = torch.float64, torch.float32


def _id(cell, layers, bidirectional, bias, batch_first, with_hx):
    return (f"{cell}-L{layers}-{'bi' if bidirectional else 'uni'}-{'bias' if bias else 'nobias'}"
            f"-{'bf' if batch_first else 'tf'}-{'hx' if with_hx else 'nohx'}")


# ---------------------------------------------------------------- batched, full cross product
FULL = list(itertools.product(CELLS, (1, 2, 3), (False, True), (False, True), (False, True), (False, True)))


@pytest.mark.parametrize("cell,layers,bidirectional,bias,batch_first,with_hx", FULL,
                         ids=[_id(*c) for c in FULL])
def test_batched_float64(cell, layers, bidirectional, bias, batch_first, with_hx, device):
    ref, ours = make_pair(cell, dtype=F64, num_layers=layers, bidirectional=bidirectional, bias=bias,
                          batch_first=batch_first, device=device)
    x, hx = make_inputs(ref, with_hx=with_hx)
    check_parity(ref, ours, x, hx)


# ---------------------------------------------------------------- unbatched 2-D input
UNBATCHED = list(itertools.product(CELLS, (1, 2), (False, True), (False, True), (False, True)))


@pytest.mark.parametrize("cell,layers,bidirectional,batch_first,with_hx", UNBATCHED,
                         ids=[_id(c, l, bi, True, bf, hx) for c, l, bi, bf, hx in UNBATCHED])
def test_unbatched_float64(cell, layers, bidirectional, batch_first, with_hx, device):
    ref, ours = make_pair(cell, dtype=F64, num_layers=layers, bidirectional=bidirectional,
                          batch_first=batch_first, device=device)
    x, hx = make_inputs(ref, batched=False, with_hx=with_hx)
    assert x.dim() == 2
    errors = check_parity(ref, ours, x, hx)
    # The unbatched forms come back unbatched: output [T, D*H], h_n [L*D, H].
    out = ours(x, hx)
    assert out[0].shape == (T, (2 if bidirectional else 1) * H)
    h_n = out[1][0] if cell == "LSTM" else out[1]
    assert h_n.shape == (layers * (2 if bidirectional else 1), H)
    assert errors["out"] <= tolerance(device, F64)["atol"]


# ---------------------------------------------------------------- LSTM with projections
PROJ = list(itertools.product((1, 3), (1, 2, 3), (False, True), (False, True), (False, True), (False, True)))


@pytest.mark.parametrize("proj_size,layers,bidirectional,bias,batch_first,with_hx", PROJ,
                         ids=[f"P{p}-" + _id("LSTM", l, bi, b, bf, hx) for p, l, bi, b, bf, hx in PROJ])
def test_lstm_proj_float64(proj_size, layers, bidirectional, bias, batch_first, with_hx, device):
    ref, ours = make_pair("LSTM", dtype=F64, num_layers=layers, bidirectional=bidirectional, bias=bias,
                          batch_first=batch_first, proj_size=proj_size, device=device)
    x, hx = make_inputs(ref, with_hx=with_hx)
    check_parity(ref, ours, x, hx)
    out, (h_n, c_n) = ours(x, hx)
    assert out.shape[-1] == (2 if bidirectional else 1) * proj_size
    assert h_n.shape[-1] == proj_size and c_n.shape[-1] == H


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_proj_unbatched_float64(bidirectional, with_hx, device):
    ref, ours = make_pair("LSTM", dtype=F64, num_layers=2, bidirectional=bidirectional, proj_size=2,
                          device=device)
    x, hx = make_inputs(ref, batched=False, with_hx=with_hx)
    check_parity(ref, ours, x, hx)


# ---------------------------------------------------------------- float32, representative subset
F32_CONFIGS = [
    # (cell, kwargs, batched, with_hx)
    *[(c, dict(num_layers=2, bidirectional=True), True, True) for c in CELLS],
    *[(c, dict(num_layers=1, bias=False, batch_first=True), True, False) for c in CELLS],
    *[(c, dict(num_layers=3, batch_first=True), True, True) for c in CELLS],
    *[(c, dict(num_layers=2, bidirectional=True), False, True) for c in CELLS],
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3), True, True),
    ("LSTM", dict(num_layers=1, bias=False, proj_size=2, batch_first=True), True, False),
    ("LSTM", dict(num_layers=2, proj_size=1), False, True),
]


@pytest.mark.parametrize("cell,kwargs,batched,with_hx", F32_CONFIGS,
                         ids=[f"{c}-{'-'.join(f'{k}={v}' for k, v in kw.items())}-"
                              f"{'batched' if b else 'unbatched'}-{'hx' if h else 'nohx'}"
                              for c, kw, b, h in F32_CONFIGS])
def test_float32(cell, kwargs, batched, with_hx, device):
    ref, ours = make_pair(cell, dtype=F32, device=device, **kwargs)
    x, hx = make_inputs(ref, batched=batched, with_hx=with_hx)
    check_parity(ref, ours, x, hx)
    assert ours(x, hx)[0].dtype == F32


# ---------------------------------------------------------------- edge shapes and call forms
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("seq_len,batch,input_size,hidden_size",
                         [(1, 1, 4, 5), (5, 3, 1, 1), (7, 1, 2, 3), (1, 6, 3, 2)],
                         ids=["T1-B1", "I1-H1", "B1", "T1"])
def test_edge_sizes(cell, seq_len, batch, input_size, hidden_size, device):
    ref, ours = make_pair(cell, input_size, hidden_size, num_layers=2, bidirectional=True, device=device)
    x, hx = make_inputs(ref, with_hx=True, seq_len=seq_len, batch=batch)
    check_parity(ref, ours, x, hx)


@pytest.mark.parametrize("cell", CELLS)
def test_large_batch_multithreaded_rows(cell, device):
    """Enough rows per step (B=600 with 4*64 gate columns) for the pointwise passes to be
    split across threads by at::parallel_for (on CUDA: across many thread blocks)."""
    ref, ours = make_pair(cell, 8, 64, num_layers=2, bidirectional=True, device=device)
    x, hx = make_inputs(ref, with_hx=True, seq_len=3, batch=600)
    check_parity(ref, ours, x, hx)


def test_large_batch_lstm_proj(device):
    ref, ours = make_pair("LSTM", 8, 64, num_layers=2, bidirectional=True, proj_size=7, device=device)
    x, hx = make_inputs(ref, with_hx=True, seq_len=3, batch=600)
    check_parity(ref, ours, x, hx)


@pytest.mark.parametrize("cell", CELLS)
def test_zero_batch(cell, device):
    """An empty batch: outputs and final states of shape [.., 0, ..] and gradients (all zero
    for the parameters, empty for the input) as torch.nn gives them."""
    ref, ours = make_pair(cell, num_layers=2, device=device)
    x = torch.zeros(T, 0, I, dtype=F64, device=device)
    expected, got = run(ref, x), run(ours, x)
    assert got["out"].shape == expected["out"].shape == (T, 0, H)
    assert_results_close(expected, got, what=f"{cell} batch 0")


@pytest.mark.parametrize("cell", CELLS)
def test_grad_through_final_state_only(cell, device):
    """Only h_n enters the loss (the output's gradient is None inside the ops)."""
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True, device=device)
    x, hx = make_inputs(ref, with_hx=True)
    grads = []
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        _, state = m(xx, hx)
        h_n = state[0] if cell == "LSTM" else state
        weighted_loss([h_n], seed=3).backward()
        grads.append([xx.grad] + [p.grad for p in m.parameters()])
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected, **tolerance(device, F64))


@pytest.mark.parametrize("cell", CELLS)
def test_grad_of_parameters_only(cell, device):
    """Neither x nor hx requires grad: only parameter gradients are produced."""
    ref, ours = make_pair(cell, num_layers=2, device=device)
    x, hx = make_inputs(ref, with_hx=True)
    grads = []
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        out = m(x, hx)[0]
        weighted_loss([out], seed=4).backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(g is not None for g in grads[1])
    for expected, got in zip(*grads):
        torch.testing.assert_close(got, expected, **tolerance(device, F64))


@pytest.mark.parametrize("cell", CELLS)
def test_double_backward(cell, device):
    """create_graph=True: a gradient of a gradient (e.g. a gradient penalty) matches torch.nn
    (on CUDA torch.nn's native kernels: cuDNN has no double backward)."""
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True, device=device)
    x, hx = make_inputs(ref, with_hx=True)
    results = []
    for m in (ref, ours):
        with torch_oracle(m, double_backward=True):
            xx = x.clone().requires_grad_(True)
            out = m(xx, hx)[0]
            (g,) = torch.autograd.grad((out ** 2).sum(), xx, create_graph=True)
            second = torch.autograd.grad((g ** 2).sum(), [xx, *m.parameters()])
        results.append((g.detach(), *second))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, **tolerance(device, F64))


@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_and_broadcast_inputs(cell, device):
    """x and hx as expanded (stride 0) views of leaves, and non-contiguous weights."""
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True, batch_first=True, device=device)
    for m in (ref, ours):
        for name, p in list(m.named_parameters()):
            if p.dim() == 2:
                setattr(m, name, nn.Parameter(p.detach().t().contiguous().t()))
        assert not m.weight_ih_l0.is_contiguous()
    results = []
    for m in (ref, ours):
        xb = torch.randn(1, 1, I, dtype=F64, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
        hb = torch.randn(4, 1, H, dtype=F64, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
        x, h = xb.expand(B, T, I), hb.expand(4, B, H)
        hx = (h, 0.5 * h.transpose(0, 1).contiguous().transpose(0, 1)) if cell == "LSTM" else h
        out = m(x, hx)[0]
        weighted_loss([out], seed=2).backward()
        results.append((out.detach(), xb.grad, hb.grad, *[p.grad for p in m.parameters()]))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, **tolerance(device, F64))


@pytest.mark.parametrize("cell", CELLS)
def test_no_grad_and_inference_mode(cell, device):
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True, device=device)
    x, hx = make_inputs(ref, with_hx=True)
    expected = ref(x, hx)[0]
    with torch.no_grad():
        got = ours(x, hx)[0]
    assert not got.requires_grad
    torch.testing.assert_close(got, expected.detach(), **tolerance(device, F64))
    with torch.inference_mode():
        got = ours(x, hx)[0]
    torch.testing.assert_close(got, expected.detach(), **tolerance(device, F64))


@pytest.mark.parametrize("cell", CELLS)
def test_repeated_calls_are_independent(cell, device):
    """A module keeps no state between calls; two backward passes accumulate like torch.nn's."""
    ref, ours = make_pair(cell, num_layers=2, device=device)
    x, hx = make_inputs(ref, with_hx=True)
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        for _ in range(2):
            m(x, hx)[0].sum().backward()
    first = ours(x, hx)[0].detach()
    torch.testing.assert_close(ours(x, hx)[0].detach(), first, rtol=0, atol=0)
    for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, **tolerance(device, F64), msg=name)


# ---------------------------------------------------------------- weights interchange
INIT_CONFIGS = [
    ("LSTM", {}), ("LSTM", dict(num_layers=3, bidirectional=True)), ("LSTM", dict(bias=False, num_layers=2)),
    ("LSTM", dict(proj_size=2, num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=3, bias=False)),
    ("GRU", {}), ("GRU", dict(num_layers=3, bidirectional=True)), ("GRU", dict(bias=False, num_layers=2)),
    ("RNN_TANH", dict(num_layers=2, bidirectional=True)), ("RNN_TANH", dict(bias=False)),
    ("RNN_RELU", dict(num_layers=3)), ("RNN_RELU", dict(bias=False, bidirectional=True)),
]
INIT_IDS = [f"{c}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for c, kw in INIT_CONFIGS]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("cell,kwargs", INIT_CONFIGS, ids=INIT_IDS)
def test_same_seed_gives_same_initial_weights(cell, kwargs, dtype, device):
    """Constructed on the device: the weights come from that device's generator."""
    ref_cls, our_cls, extra = module_classes(cell)
    torch.manual_seed(123)
    ref = ref_cls(I, H, dtype=dtype, device=device, **extra, **kwargs)
    torch.manual_seed(123)
    ours = our_cls(I, H, dtype=dtype, device=device, **extra, **kwargs)
    after_ours = torch.rand(3, device=device)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for name in ref_sd:
        assert our_sd[name].dtype == dtype
        assert our_sd[name].device == ref_sd[name].device
        assert torch.equal(our_sd[name], ref_sd[name]), name
    # Construction makes as many RNG draws as torch.nn's: the generator ends in the same state.
    torch.manual_seed(123)
    ref_cls(I, H, dtype=dtype, device=device, **extra, **kwargs)
    assert torch.equal(after_ours, torch.rand(3, device=device))


def test_reset_parameters_matches_torch(device):
    torch.manual_seed(0)
    ref, ours = nn.GRU(I, H, num_layers=2, device=device), rnnext.GRU(I, H, num_layers=2, device=device)
    torch.manual_seed(7)
    ref.reset_parameters()
    torch.manual_seed(7)
    ours.reset_parameters()
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cell,kwargs", INIT_CONFIGS, ids=INIT_IDS)
def test_state_dict_loads_both_ways(cell, kwargs, device):
    ref_cls, our_cls, extra = module_classes(cell)
    torch.manual_seed(1)
    ref = ref_cls(I, H, dtype=F64, device=device, **extra, **kwargs)
    torch.manual_seed(2)
    ours = our_cls(I, H, dtype=F64, device=device, **extra, **kwargs)
    assert not torch.equal(ours.weight_ih_l0, ref.weight_ih_l0)

    # torch.nn -> rnnext (strict: same keys, same shapes)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, p in ref.named_parameters():
        assert torch.equal(getattr(ours, name), p), name
    x, hx = make_inputs(ref, with_hx=True)
    check_parity(ref, ours, x, hx)

    # rnnext -> torch.nn
    torch.manual_seed(3)
    ours2 = our_cls(I, H, dtype=F64, device=device, **extra, **kwargs)
    result = ref.load_state_dict(ours2.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, p in ours2.named_parameters():
        assert torch.equal(getattr(ref, name), p), name
    check_parity(ref, ours2, x, hx)


@pytest.mark.parametrize("cell,kwargs", INIT_CONFIGS, ids=INIT_IDS)
def test_copy_parameters_both_directions(cell, kwargs, device):
    ref_cls, our_cls, extra = module_classes(cell)
    torch.manual_seed(1)
    ref = ref_cls(I, H, dtype=F64, device=device, **extra, **kwargs)
    torch.manual_seed(2)
    ours = our_cls(I, H, dtype=F64, device=device, **extra, **kwargs)

    assert rnnext.copy_parameters(ref, ours) is ours
    for name, p in ref.named_parameters():
        assert torch.equal(getattr(ours, name), p), name
        assert getattr(ours, name) is not p  # copied, not shared
    x, hx = make_inputs(ref, with_hx=True)
    check_parity(ref, ours, x, hx)

    torch.manual_seed(3)
    ours2 = our_cls(I, H, dtype=F64, device=device, **extra, **kwargs)
    assert rnnext.copy_parameters(ours2, ref) is ref
    for name, p in ours2.named_parameters():
        assert torch.equal(getattr(ref, name), p), name
    check_parity(ref, ours2, x, hx)


def test_copy_parameters_keeps_destination_dtype(device):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, num_layers=2, dtype=F64, device=device)
    ours = rnnext.LSTM(I, H, num_layers=2, dtype=F32, device=device)
    rnnext.copy_parameters(ref, ours)
    for name, p in ref.named_parameters():
        assert getattr(ours, name).dtype == F32 and getattr(ours, name).device == p.device
        assert torch.equal(getattr(ours, name), p.to(F32)), name


def test_copy_parameters_ignores_batch_first(device):
    torch.manual_seed(0)
    ref = nn.GRU(I, H, batch_first=True, dtype=F64, device=device)
    ours = rnnext.GRU(I, H, batch_first=False, dtype=F64, device=device)
    rnnext.copy_parameters(ref, ours)
    x = torch.randn(B, T, I, dtype=F64).to(device)
    torch.testing.assert_close(ours(x.transpose(0, 1))[0].transpose(0, 1), ref(x)[0], **tolerance(device, F64))


@pytest.mark.parametrize("src,dst", [
    (lambda: nn.LSTM(I, H), lambda: rnnext.GRU(I, H)),
    (lambda: nn.RNN(I, H, nonlinearity="tanh"), lambda: rnnext.RNN(I, H, nonlinearity="relu")),
    (lambda: nn.LSTM(I, H), lambda: rnnext.LSTM(I + 1, H)),
    (lambda: nn.LSTM(I, H), lambda: rnnext.LSTM(I, H + 1)),
    (lambda: nn.GRU(I, H, num_layers=2), lambda: rnnext.GRU(I, H)),
    (lambda: nn.GRU(I, H, bidirectional=True), lambda: rnnext.GRU(I, H)),
    (lambda: nn.RNN(I, H, bias=False), lambda: rnnext.RNN(I, H)),
    (lambda: nn.LSTM(I, H, proj_size=2), lambda: rnnext.LSTM(I, H)),
    (lambda: rnnext.LSTM(I, H, proj_size=2), lambda: nn.LSTM(I, H, proj_size=3)),
], ids=["cell", "nonlinearity", "input_size", "hidden_size", "num_layers", "bidirectional", "bias",
        "proj_size", "proj_size-reverse"])
def test_copy_parameters_rejects_mismatch(src, dst, device):
    src, dst = src().to(device), dst().to(device)
    before = {n: p.detach().clone() for n, p in dst.named_parameters()}
    with pytest.raises(ValueError):
        rnnext.copy_parameters(src, dst)
    for n, p in dst.named_parameters():
        assert torch.equal(p, before[n]), f"{n} modified by a rejected copy"


def test_copy_parameters_rejects_non_rnn(device):
    with pytest.raises(TypeError):
        rnnext.copy_parameters(nn.Linear(3, 4, device=device), rnnext.LSTM(3, 4, device=device))


FROM_TORCH = [
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True, dropout=0.25, proj_size=2)),
    ("LSTM", dict(bias=False)),
    ("GRU", dict(num_layers=3, dropout=0.5, batch_first=True)),
    ("GRU", dict(bias=False, bidirectional=True)),
    ("RNN_TANH", dict(num_layers=2, bias=False)),
    ("RNN_RELU", dict(bidirectional=True, batch_first=True, num_layers=2, dropout=0.1)),
]
CONFIG_ATTRS = ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                "bidirectional", "proj_size")


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cell,kwargs", FROM_TORCH,
                         ids=[f"{c}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in FROM_TORCH])
def test_from_torch(cell, kwargs, training, dtype, device):
    ref_cls, our_cls, extra = module_classes(cell)
    torch.manual_seed(0)
    ref = ref_cls(I, H, dtype=dtype, **extra, **kwargs).to(device).train(training)
    for made in (rnnext.from_torch(ref), our_cls.from_torch(ref)):
        assert type(made) is our_cls
        for attr in CONFIG_ATTRS:
            assert getattr(made, attr) == getattr(ref, attr), attr
        if cell.startswith("RNN"):
            assert made.nonlinearity == ref.nonlinearity
        assert made.training == training
        assert made.weight_ih_l0.dtype == dtype and made.weight_ih_l0.device == ref.weight_ih_l0.device
        assert [n for n, _ in made.named_parameters()] == [n for n, _ in ref.named_parameters()]
        for name, p in ref.named_parameters():
            assert torch.equal(getattr(made, name), p), name
            assert getattr(made, name).data_ptr() != p.data_ptr()  # an independent copy
        ref.eval()
        made.eval()
        x, hx = make_inputs(ref, with_hx=True)
        assert_results_close(run(ref, x, hx), run(made, x, hx), what="from_torch")
        ref.train(training)


@pytest.mark.parametrize("our_cls,ref", [
    (rnnext.GRU, lambda: nn.LSTM(I, H)),
    (rnnext.LSTM, lambda: nn.RNN(I, H)),
    (rnnext.RNN, lambda: nn.GRU(I, H)),
], ids=["GRU<-LSTM", "LSTM<-RNN", "RNN<-GRU"])
def test_from_torch_classmethod_rejects_other_cell(our_cls, ref, device):
    with pytest.raises(TypeError):
        our_cls.from_torch(ref().to(device))


def test_from_torch_rejects_non_rnn(device):
    with pytest.raises(TypeError):
        rnnext.from_torch(nn.Linear(3, 4, device=device))


@pytest.mark.parametrize("cell", CELLS)
def test_module_dtype_conversion(cell, device):
    """.double() / .float() on an rnnext module, as on torch.nn's, keep the two in step."""
    ref, ours = make_pair(cell, dtype=F32, num_layers=2, bidirectional=True, device=device)
    ref.double()
    ours.double()
    assert all(p.dtype == F64 for p in ours.parameters())
    x, hx = make_inputs(ref, with_hx=True)
    check_parity(ref, ours, x, hx)


@pytest.mark.parametrize("cell", CELLS)
def test_frozen_parameters(cell, device):
    """Some parameters with requires_grad=False: they get no gradient, the others match."""
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True, device=device)
    for m in (ref, ours):
        m.weight_ih_l0.requires_grad_(False)
        m.bias_hh_l1_reverse.requires_grad_(False)
    x, hx = make_inputs(ref, with_hx=True)
    got = run(ours, x, hx)
    assert got["param.weight_ih_l0"] is None and got["param.bias_hh_l1_reverse"] is None
    assert_results_close(run(ref, x, hx), got, what="frozen")


@pytest.mark.parametrize("cell", CELLS)
def test_backward_twice_with_retain_graph(cell, device):
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True, device=device)
    x, hx = make_inputs(ref, with_hx=True)
    results = []
    for m in (ref, ours):
        xx = x.clone().requires_grad_(True)
        y = m(xx, hx)[0]
        (g1,) = torch.autograd.grad(y.sum(), xx, retain_graph=True)
        (g2,) = torch.autograd.grad((y * y).sum(), xx)
        results.append((g1, g2))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, **tolerance(device, F64))

"""Dropout between stacked layers, as torch.nn: only in training mode, only between layers
(never after the last one), with probability p, and drawing from the global RNG exactly as
torch.nn's CPU kernels do (so a fixed seed gives torch.nn's result in training mode too).
On CUDA the same, against torch.nn's native CUDA kernels, which draw their masks with
at::dropout from the CUDA generator as rnnext does (cuDNN's dropout draws its own masks;
see helpers.torch_oracle)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnnext
from helpers import (CELLS, assert_results_close, check_parity, make_inputs, make_pair, module_classes, run,
                     tolerance, torch_oracle)

F64, F32 = torch.float64, torch.float32


@pytest.fixture
def record_dropout(monkeypatch):
    """Wraps torch.nn.functional.dropout (which rnnext calls between layers) and records
    every call as (input, p, training, output)."""
    calls = []
    real = F.dropout

    def recording(input, p=0.5, training=True, inplace=False):
        out = real(input, p, training, inplace)
        calls.append((input.detach().clone(), p, training, out.detach().clone()))
        return out

    monkeypatch.setattr(torch.nn.functional, "dropout", recording)
    return calls


@pytest.mark.parametrize("cell", CELLS)
def test_training_output_differs_from_eval(cell, device):
    _, ours = make_pair(cell, num_layers=2, dropout=0.5, device=device)
    x, hx = make_inputs(ours, with_hx=True)
    ours.eval()
    eval_out = ours(x, hx)[0]
    torch.testing.assert_close(ours(x, hx)[0], eval_out, rtol=0, atol=0)  # eval is deterministic
    ours.train()
    torch.manual_seed(0)
    train_out = ours(x, hx)[0]
    train_out2 = ours(x, hx)[0]
    assert (train_out - eval_out).abs().max() > 1e-3
    assert (train_out2 - train_out).abs().max() > 1e-3  # a fresh mask per call


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize("cell", CELLS)
def test_dropout_mask_rate_and_scaling(cell, p, layers, record_dropout, device):
    """Dropout is called once between each pair of layers (not after the last), with p and
    training=True, on the concatenated directions; about a fraction p of the elements are
    zeroed and the rest are scaled by 1 / (1 - p)."""
    hidden = 32
    _, ours = make_pair(cell, 8, hidden, num_layers=layers, dropout=p, bidirectional=True, device=device)
    ours.train()
    x, hx = make_inputs(ours, with_hx=True, seq_len=20, batch=16)
    torch.manual_seed(1)
    ours(x, hx)
    assert len(record_dropout) == layers - 1
    for inp, p_used, training, out in record_dropout:
        assert p_used == p and training is True
        assert inp.shape == (20, 16, 2 * hidden)
        live = inp != 0  # about half of a relu RNN's outputs are exactly zero already
        assert live.sum() > 0.4 * inp.numel()
        dropped = (out == 0) & live
        rate = dropped.sum().item() / live.sum().item()
        # >= 8k live elements: the standard deviation of the rate is < 0.006.
        assert abs(rate - p) < 0.03, rate
        kept = (~dropped) & live
        torch.testing.assert_close(out[kept], inp[kept] / (1 - p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_dropped_tensor_is_the_next_layers_input(cell, record_dropout, device):
    """Running torch.nn's single layer (with rnnext's layer-1 weights) on the recorded dropout
    output and layer 1's initial state reproduces rnnext's output: the mask is applied to the
    input of the next layer, and to nothing else."""
    ref_cls, our_cls, extra = module_classes(cell)
    _, ours = make_pair(cell, num_layers=2, dropout=0.4, device=device)
    ours.train()
    x, hx = make_inputs(ours, with_hx=True)
    torch.manual_seed(2)
    out, state = ours(x, hx)
    assert len(record_dropout) == 1
    dropped = record_dropout[0][3]
    assert (dropped == 0).any()

    layer1 = ref_cls(ours.hidden_size, ours.hidden_size, dtype=F64, device=device, **extra)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer1, name + "_l0").copy_(getattr(ours, name + "_l1"))
    hx1 = (hx[0][1:], hx[1][1:]) if cell == "LSTM" else hx[1:]
    expected, expected_state = layer1(dropped, hx1)
    torch.testing.assert_close(out, expected, **tolerance(device, F64))
    h_n = state[0] if cell == "LSTM" else state
    expected_h = expected_state[0] if cell == "LSTM" else expected_state
    torch.testing.assert_close(h_n[1:], expected_h, **tolerance(device, F64))


@pytest.mark.parametrize("cell", CELLS)
def test_no_dropout_call_in_eval_or_single_layer(cell, record_dropout, device):
    _, ours = make_pair(cell, num_layers=3, dropout=0.5, device=device)
    x, hx = make_inputs(ours, with_hx=True)
    ours.eval()
    ours(x, hx)
    assert record_dropout == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, single = make_pair(cell, num_layers=1, dropout=0.5, device=device)
    single.train()
    single(x, hx[:1] if cell != "LSTM" else (hx[0][:1], hx[1][:1]))
    assert record_dropout == []


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_eval_mode_matches_torch(cell, bidirectional, device):
    ref, ours = make_pair(cell, num_layers=3, dropout=0.5, bidirectional=bidirectional, device=device)
    ref.eval()
    ours.eval()
    x, hx = make_inputs(ref, with_hx=True)
    check_parity(ref, ours, x, hx)


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_flow_in_training_mode(cell, device):
    _, ours = make_pair(cell, num_layers=3, dropout=0.3, bidirectional=True, device=device)
    ours.train()
    x, hx = make_inputs(ours, with_hx=True)
    torch.manual_seed(3)
    res = run(ours, x, hx)
    for key, g in res.items():
        if key.startswith("param.") or key in ("grad_x", "grad_h0", "grad_c0"):
            if g is None and key == "grad_c0" and cell != "LSTM":
                continue
            assert g is not None, key
            assert torch.isfinite(g).all(), key
            assert g.abs().max() > 0, key


# Verified property: on CPU, torch.nn applies inter-layer dropout with the same RNG draws
# (one bernoulli mask per layer boundary, in layer order), so with the same seed rnnext in
# training mode reproduces torch.nn in training mode, gradients included.
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_training_mode_matches_torch_with_same_seed(cell, bidirectional, dtype, device):
    ref, ours = make_pair(cell, dtype=dtype, num_layers=3, dropout=0.4, bidirectional=bidirectional, device=device)
    ref.train()
    ours.train()
    x, hx = make_inputs(ref, with_hx=True)
    torch.manual_seed(5)
    expected = run(ref, x, hx)
    torch.manual_seed(5)
    got = run(ours, x, hx)
    assert_results_close(expected, got, what="training with dropout")
    # and a different seed gives a different result (the comparison above is not vacuous)
    torch.manual_seed(6)
    other = run(ours, x, hx)
    assert (other["out"] - got["out"]).abs().max() > 1e-3


@pytest.mark.parametrize("cell", CELLS)
def test_training_mode_matches_torch_unbatched_and_no_grad(cell, device):
    ref, ours = make_pair(cell, num_layers=2, dropout=0.5, batch_first=True, device=device)
    x, hx = make_inputs(ref, batched=False, with_hx=True)
    torch.manual_seed(8)
    expected = run(ref, x, hx)
    torch.manual_seed(8)
    got = run(ours, x, hx)
    assert_results_close(expected, got, what="unbatched training")
    with torch.no_grad():  # training mode drops even without autograd, as torch.nn does
        torch.manual_seed(9)
        with torch_oracle(ref):
            expected = ref(x, hx)[0]
        torch.manual_seed(9)
        got = ours(x, hx)[0]
    torch.testing.assert_close(got, expected, **tolerance(device, F64))


def test_training_mode_matches_torch_lstm_proj(device):
    ref, ours = make_pair("LSTM", num_layers=3, dropout=0.4, bidirectional=True, proj_size=2, device=device)
    x, hx = make_inputs(ref, with_hx=True)
    torch.manual_seed(10)
    expected = run(ref, x, hx)
    torch.manual_seed(10)
    got = run(ours, x, hx)
    assert_results_close(expected, got, what="LSTM proj training")


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_one_zeroes_the_next_layers_input(cell, record_dropout, device):
    """p = 1: the next layer sees zeros; the last layer's output is not dropped; torch.nn agrees."""
    ref, ours = make_pair(cell, num_layers=2, dropout=1.0, device=device)
    x, hx = make_inputs(ref, with_hx=True)
    torch.manual_seed(11)
    got = run(ours, x, hx)
    assert len(record_dropout) == 1 and torch.count_nonzero(record_dropout[0][3]) == 0
    assert torch.count_nonzero(got["out"]) > 0
    torch.manual_seed(11)
    expected = run(ref, x, hx)
    assert_results_close(expected, got, what="dropout=1")


# ---------------------------------------------------------------- the num_layers=1 warning
def _construct_warnings(cls, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls(*args, **kwargs)
    return [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("dropout", [0.2, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_warning_for_dropout_with_one_layer(cell, dropout):
    ref_cls, our_cls, extra = module_classes(cell)
    expected = _construct_warnings(ref_cls, 4, 5, dropout=dropout, **extra)
    got = _construct_warnings(our_cls, 4, 5, dropout=dropout, **extra)
    assert len(expected) == 1 and expected[0][0] is UserWarning
    assert got == expected
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        our_cls(4, 5, num_layers=1, dropout=dropout, **extra)


@pytest.mark.parametrize("kwargs", [dict(num_layers=2, dropout=0.5), dict(num_layers=1, dropout=0.0),
                                    dict(num_layers=1)], ids=["L2-p0.5", "L1-p0", "L1-default"])
@pytest.mark.parametrize("cell", CELLS)
def test_no_warning_otherwise(cell, kwargs):
    _, our_cls, extra = module_classes(cell)
    assert _construct_warnings(our_cls, 4, 5, **extra, **kwargs) == []


def test_from_torch_keeps_dropout():
    ref = nn.GRU(4, 5, num_layers=3, dropout=0.25)
    made = rnnext.from_torch(ref)
    assert made.dropout == 0.25 and made.training

"""Gradients of gradients: create_graph=True takes a differentiable path through rnnext's
layers (gradient penalties, meta-learning), matching torch.nn; gradgradcheck in float64."""
import pytest
import torch
from torch import nn
from torch.autograd import gradgradcheck

import rnnext

F64 = torch.float64


def _pairs():
    yield nn.LSTM(3, 4, bidirectional=True, dtype=F64)
    yield nn.LSTM(3, 4, proj_size=2, dtype=F64)
    yield nn.GRU(3, 4, num_layers=2, dtype=F64)
    yield nn.RNN(3, 4, nonlinearity="tanh", bidirectional=True, dtype=F64)
    yield nn.RNN(3, 4, nonlinearity="relu", dtype=F64)


@pytest.mark.parametrize("ref", list(_pairs()), ids=lambda m: repr(m))
def test_gradgradcheck_module(ref):
    ours = rnnext.from_torch(ref)
    names = [n for n, _ in ours.named_parameters()]
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)

    def f(x, *params):
        out, _ = torch.func.functional_call(ours, dict(zip(names, params)), (x,))
        return out

    assert gradgradcheck(f, (x, *ours.parameters()))


@pytest.mark.parametrize("ref", list(_pairs()), ids=lambda m: repr(m))
def test_gradient_penalty_matches_torch(ref):
    """d/dtheta |d loss / dx|^2, the usual gradient penalty, equals torch.nn's."""
    ours = rnnext.from_torch(ref)
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(ref.num_layers * (2 if ref.bidirectional else 1), 2,
                     ref.proj_size or ref.hidden_size, dtype=F64, requires_grad=True)
    results = []
    for m in (ref, ours):
        hx = (h0, torch.zeros(h0.shape[0], 2, ref.hidden_size, dtype=F64)) if isinstance(m, (nn.LSTM, rnnext.LSTM)) else h0
        out, _ = m(x, hx)
        gx, gh = torch.autograd.grad(out.square().sum(), (x, h0), create_graph=True)
        penalty = gx.square().sum() + gh.square().sum()
        results.append(torch.autograd.grad(penalty, [x, h0] + list(m.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)


def test_backward_in_eval_mode():
    """cuDNN refuses backward in eval mode; rnnext must not."""
    ref = nn.GRU(3, 4, num_layers=2, dropout=0.5, dtype=F64).eval()
    ours = rnnext.from_torch(ref).eval()
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    (g_ref,) = torch.autograd.grad(ref(x)[0].sum(), x)
    (g_ours,) = torch.autograd.grad(ours(x)[0].sum(), x)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-12)

"""Gradients of gradients: create_graph=True takes a differentiable path through rnnext's
layers (gradient penalties, meta-learning), matching torch.nn; gradgradcheck in float64. On
the CPU and on CUDA (where torch.nn, the oracle, runs its native kernels: cuDNN has no double
backward and no backward in eval mode; see helpers.torch_oracle)."""
import pytest
import torch
from torch.autograd import gradgradcheck

from helpers import F64, make_pair, tolerance, torch_oracle

# (cell, kwargs) of the module pairs, input_size 3, hidden_size 4
CONFIGS = [
    ("LSTM", dict(bidirectional=True)),
    ("LSTM", dict(proj_size=2)),
    ("GRU", dict(num_layers=2)),
    ("RNN_TANH", dict(bidirectional=True)),
    ("RNN_RELU", {}),
]
IDS = [f"{c}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for c, kw in CONFIGS]


@pytest.mark.parametrize("cell,kwargs", CONFIGS, ids=IDS)
def test_gradgradcheck_module(cell, kwargs, device):
    _, ours = make_pair(cell, 3, 4, dtype=F64, via="from_torch", device=device, **kwargs)
    names = [n for n, _ in ours.named_parameters()]
    x = torch.randn(3, 2, 3, dtype=F64).to(device).requires_grad_()

    def f(x, *params):
        out, _ = torch.func.functional_call(ours, dict(zip(names, params)), (x,))
        return out

    assert gradgradcheck(f, (x, *ours.parameters()))


@pytest.mark.parametrize("cell,kwargs", CONFIGS, ids=IDS)
def test_gradient_penalty_matches_torch(cell, kwargs, device):
    """d/dtheta |d loss / dx|^2, the usual gradient penalty, equals torch.nn's."""
    ref, ours = make_pair(cell, 3, 4, dtype=F64, via="from_torch", device=device, **kwargs)
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, dtype=F64).to(device).requires_grad_()
    h0 = torch.randn(ref.num_layers * (2 if ref.bidirectional else 1), 2,
                     ref.proj_size or ref.hidden_size, dtype=F64).to(device).requires_grad_()
    results = []
    for m in (ref, ours):
        hx = (h0, torch.zeros(h0.shape[0], 2, ref.hidden_size, dtype=F64, device=device)) if cell == "LSTM" else h0
        with torch_oracle(m, double_backward=True):
            out, _ = m(x, hx)
            gx, gh = torch.autograd.grad(out.square().sum(), (x, h0), create_graph=True)
            penalty = gx.square().sum() + gh.square().sum()
            results.append(torch.autograd.grad(penalty, [x, h0] + list(m.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **tolerance(device, F64))


def test_backward_in_eval_mode(device):
    """cuDNN refuses backward in eval mode; rnnext must not."""
    ref, ours = make_pair("GRU", 3, 4, dtype=F64, via="from_torch", device=device, num_layers=2, dropout=0.5)
    ref.eval()
    ours.eval()
    x = torch.randn(4, 2, 3, dtype=F64).to(device).requires_grad_()
    with torch_oracle(ref):
        (g_ref,) = torch.autograd.grad(ref(x)[0].sum(), x)
    (g_ours,) = torch.autograd.grad(ours(x)[0].sum(), x)
    torch.testing.assert_close(g_ours, g_ref, **tolerance(device, F64))

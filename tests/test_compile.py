"""torch.compile(fullgraph=True) of models built on rnnext: no graph break, forward and
backward equal to eager rnnext and to torch.nn, on the CPU and on CUDA."""
import pytest
import torch
import torch._inductor.config
from torch import nn

import rnnext
from helpers import F32, F64, leaf, make_pair, tolerance, weighted_loss

# aot_eager runs Dynamo (fullgraph: any graph break fails) and AOTAutograd over the fake
# kernels and the registered autograd, without Inductor's C++ compile time; one test below
# goes through Inductor as well.
BACKEND = "aot_eager"


class Tagger(nn.Module):
    """A small sequence model: embedding-free RNN stack plus a linear head."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        out = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(out, 3, dtype=rnn.weight_ih_l0.dtype, device=rnn.weight_ih_l0.device)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y)


# (cell, constructor kwargs) per model kind
KINDS = {
    "LSTM": ("LSTM", dict(num_layers=2, bidirectional=True)),
    "GRU": ("GRU", dict(num_layers=2, bidirectional=True)),
    "RNN": ("RNN_RELU", dict(num_layers=2)),
}


def _run(model, x):
    """The output and the gradients of x and of every parameter under helpers.weighted_loss."""
    x = leaf(x)
    out = model(x)
    grads = torch.autograd.grad(weighted_loss([out]), [x] + list(model.parameters()))
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_fullgraph_forward_backward_matches_eager_and_torch(kind, batched, device):
    cell, kwargs = KINDS[kind]
    ref_rnn, ours_rnn = make_pair(cell, 4, 6, dtype=F64, via="from_torch", device=device, **kwargs)
    ref = Tagger(ref_rnn)
    ours = Tagger(ours_rnn)
    ours.head.load_state_dict(ref.head.state_dict())
    x = torch.randn(*((5, 3, 4) if batched else (5, 4)), dtype=F64).to(device)

    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend=BACKEND)
    got = _run(compiled, x)
    eager = _run(ours, x)
    expected = _run(ref, x)
    for g, e, t in zip(got, eager, expected):
        assert torch.equal(g, e)  # same kernels, same order: bit-identical
        torch.testing.assert_close(g, t, **tolerance(device, F64))


@pytest.mark.parametrize("cell_cls", [rnnext.RNNCell, rnnext.LSTMCell, rnnext.GRUCell])
def test_cells_compile_fullgraph(cell_cls, device):
    torch.manual_seed(0)
    cell = cell_cls(4, 5, dtype=F64).to(device)

    def unroll(x):
        state = None
        outs = []
        for t in range(x.shape[0]):
            state = cell(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs)

    x = torch.randn(4, 2, 4, dtype=F64).to(device).requires_grad_()
    torch._dynamo.reset()
    got = torch.compile(unroll, fullgraph=True, backend=BACKEND)(x)
    (gx,) = torch.autograd.grad(got.sum(), x)
    expected = unroll(x)
    (ex,) = torch.autograd.grad(expected.sum(), x)
    assert got.device == x.device
    assert torch.equal(got, expected)
    assert torch.equal(gx, ex)


def test_inductor_lstm_train_step(device):
    """The default backend (Inductor) too: one training step, float32."""
    ref_rnn, ours = make_pair("LSTM", 4, 8, dtype=F32, via="from_torch", device=device, batch_first=True)
    x = torch.randn(3, 6, 4).to(device).requires_grad_()
    torch._dynamo.reset()
    # No on-disk graph cache: its key does not cover the fake kernels' Python source, so a
    # build with another workspace layout could be served a stale graph.
    torch._inductor.config.fx_graph_cache = False
    compiled = torch.compile(ours, fullgraph=True)
    (y, (h, c)) = compiled(x)
    loss = y.square().sum() + h.sum() + c.sum()
    loss.backward()
    ref_x = x.detach().clone().requires_grad_()
    ry, (rh, rc) = ref_rnn(ref_x)
    (ry.square().sum() + rh.sum() + rc.sum()).backward()
    # The CPU bound is this test's own measured one (tighter than helpers.TOL's float32).
    tol = dict(atol=5e-6, rtol=5e-6) if device == "cpu" else tolerance(device, F32)
    torch.testing.assert_close(y, ry, **tol)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    for (name, p), q in zip(ours.named_parameters(), ref_rnn.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)

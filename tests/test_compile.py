"""torch.compile(fullgraph=True) of models built on rnnext: no graph break, forward and
backward equal to eager rnnext and to torch.nn."""
import pytest
import torch
import torch._inductor.config
from torch import nn

import rnnext

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
        self.head = nn.Linear(out, 3, dtype=rnn.weight_ih_l0.dtype)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y)


def _make(kind):
    if kind == "LSTM":
        return nn.LSTM(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64)
    if kind == "GRU":
        return nn.GRU(4, 6, num_layers=2, bidirectional=True, dtype=torch.float64)
    return nn.RNN(4, 6, num_layers=2, nonlinearity="relu", dtype=torch.float64)


def _run(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), [x] + list(model.parameters()))
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_fullgraph_forward_backward_matches_eager_and_torch(kind, batched):
    torch.manual_seed(0)
    ref_rnn = _make(kind)
    ref = Tagger(ref_rnn)
    ours = Tagger(rnnext.from_torch(ref_rnn))
    ours.head.load_state_dict(ref.head.state_dict())
    x = torch.randn(*((5, 3, 4) if batched else (5, 4)), dtype=torch.float64)

    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend=BACKEND)
    got = _run(compiled, x)
    eager = _run(ours, x)
    expected = _run(ref, x)
    for g, e, t in zip(got, eager, expected):
        assert torch.equal(g, e)  # same kernels, same order: bit-identical
        torch.testing.assert_close(g, t, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cell_cls", [rnnext.RNNCell, rnnext.LSTMCell, rnnext.GRUCell])
def test_cells_compile_fullgraph(cell_cls):
    torch.manual_seed(0)
    cell = cell_cls(4, 5, dtype=torch.float64)

    def unroll(x):
        state = None
        outs = []
        for t in range(x.shape[0]):
            state = cell(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs)

    x = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    got = torch.compile(unroll, fullgraph=True, backend=BACKEND)(x)
    (gx,) = torch.autograd.grad(got.sum(), x)
    expected = unroll(x)
    (ex,) = torch.autograd.grad(expected.sum(), x)
    assert torch.equal(got, expected)
    assert torch.equal(gx, ex)


def test_inductor_lstm_train_step():
    """The default backend (Inductor) too: one training step, float32."""
    torch.manual_seed(0)
    ref_rnn = nn.LSTM(4, 8, batch_first=True)
    ours = rnnext.from_torch(ref_rnn)
    x = torch.randn(3, 6, 4, requires_grad=True)
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
    torch.testing.assert_close(y, ry, atol=5e-6, rtol=5e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, atol=5e-6, rtol=5e-6)
    for (name, p), q in zip(ours.named_parameters(), ref_rnn.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=5e-6, rtol=5e-6, msg=name)

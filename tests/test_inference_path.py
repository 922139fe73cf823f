"""The forward ops' need_backward=False path (what the modules use under no_grad/inference):
same results, an empty workspace, and a clear error if a gradient is asked of it anyway."""
import pytest
import torch

import rnnext  # noqa: F401  (registers the ops)

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


def _args(cell, proj, packed, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    T, B, I, H = 6, 4, 5, 7
    Hout = 3 if proj else H
    G = GATES[cell]
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    if packed:
        batch_sizes = torch.tensor([4, 4, 3, 2, 2, 1])
        x = r(int(batch_sizes.sum()), I)
    else:
        batch_sizes = None
        x = r(T, B, I)
    args = dict(x=x, h0=r(B, Hout), c0=r(B, H), w_ih=r(G * H, I), w_hh=r(G * H, Hout), b_ih=r(G * H),
                b_hh=r(G * H), w_hr=r(Hout, H) if proj else None, batch_sizes=batch_sizes)
    return args


def _call(cell, a, reverse, need_backward):
    op = getattr(torch.ops.rnnext, f"{cell}_layer_forward")
    if cell == "lstm":
        return op(a["x"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["w_hr"],
                  a["batch_sizes"], reverse, need_backward)
    return op(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["batch_sizes"], reverse,
              need_backward)


CASES = [(c, p, k) for c in GATES for p in ((False, True) if c == "lstm" else (False,)) for k in (False, True)]


@pytest.mark.parametrize("cell,proj,packed", CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_inference_equals_training_forward(cell, proj, packed, reverse):
    a = _args(cell, proj, packed)
    train = _call(cell, a, reverse, True)
    infer = _call(cell, a, reverse, False)
    for t, i in zip(train[:-1], infer[:-1]):
        assert torch.equal(t, i)  # same kernels and order: bit-identical
    assert train[-1].shape[0] == a["x"].reshape(-1, a["x"].shape[-1]).shape[0]
    assert infer[-1].shape == (0, train[-1].shape[1])


def test_gradient_of_inference_call_raises():
    a = _args("gru", False, False)
    a["x"].requires_grad_()
    y, h_n, _ = _call("gru", a, False, False)
    with pytest.raises(RuntimeError, match="need_backward=False"):
        y.sum().backward()


def test_module_no_grad_equals_grad_forward():
    gru = rnnext.GRU(5, 7, num_layers=2, bidirectional=True)
    x = torch.randn(6, 4, 5)
    with torch.no_grad():
        y0, h0 = gru(x)
    y1, h1 = gru(x)
    assert torch.equal(y0, y1) and torch.equal(h0, h1)
    assert y1.requires_grad and not y0.requires_grad


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_default_initial_state_is_not_saved_as_a_block(mode):
    """Without hx the module's zero state is one expanded zero, so autograd keeps no
    [layers * dirs, B, H] block for it (the state a training step saves for backward)."""
    T, B, I, H = 3, 7, 3, 5  # no saved tensor but a state has B * H or 4 * B * H elements
    m = getattr(rnnext, mode)(I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = m(x)
    one_state, all_states = 4 * B * H, 4 * 4 * B * H  # bytes (float32; 2 layers x 2 directions)
    assert sizes, "nothing was saved for backward"
    assert one_state not in sizes and all_states not in sizes, sizes
    # The gradients are those of a materialised zero state.
    ref = getattr(rnnext, mode)(I, H, num_layers=2, bidirectional=True)
    ref.load_state_dict(m.state_dict())
    zeros = torch.zeros(4, B, H)
    y_ref, _ = ref(x, (zeros, zeros.clone()) if mode == "LSTM" else zeros)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)

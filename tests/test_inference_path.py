"""The forward ops' need_backward=False path (what the modules use under no_grad/inference):
same results, an empty workspace, and a clear error if a gradient is asked of it anyway. On
the CPU and on CUDA."""
import pytest
import torch

import rnnext  # noqa: F401  (registers the ops)
from helpers import F32, OP_CELLS, forward_op, op_args, tolerance

# T, B, I, H = 6, 4, 5, 7 (projection 3); packed: the batch shrinks 4, 4, 3, 2, 2, 1.
SIZES = dict(steps=6, batch=4, input_size=5, hidden_size=7, proj_size=3, scale=1.0)
BATCH_SIZES = [4, 4, 3, 2, 2, 1]


def _args(cell, proj, packed, device, reverse=False):
    return op_args(cell, proj=proj, reverse=reverse, requires_grad=False, dtype=F32, device=device,
                   batch_sizes=BATCH_SIZES if packed else None, **SIZES)


CASES = [(c, p, k) for c in OP_CELLS for p in ((False, True) if c == "lstm" else (False,)) for k in (False, True)]


@pytest.mark.parametrize("cell,proj,packed", CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_inference_equals_training_forward(cell, proj, packed, reverse, device):
    args = _args(cell, proj, packed, device, reverse)
    train = forward_op(cell)(*args, True)
    infer = forward_op(cell)(*args, False)
    for t, i in zip(train[:-1], infer[:-1]):
        assert t.device == args[0].device
        assert torch.equal(t, i)  # same kernels and order: bit-identical
    x = args[0]
    assert train[-1].shape[0] == x.reshape(-1, x.shape[-1]).shape[0]
    assert infer[-1].shape == (0, train[-1].shape[1])


def test_gradient_of_inference_call_raises(device):
    args = list(_args("gru", False, False, device))
    args[0].requires_grad_()
    y, h_n, _ = forward_op("gru")(*args, False)
    with pytest.raises(RuntimeError, match="need_backward=False"):
        y.sum().backward()


def test_module_no_grad_equals_grad_forward(device):
    torch.manual_seed(0)
    gru = rnnext.GRU(5, 7, num_layers=2, bidirectional=True, device=device)
    x = torch.randn(6, 4, 5).to(device)
    with torch.no_grad():
        y0, h0 = gru(x)
    y1, h1 = gru(x)
    assert torch.equal(y0, y1) and torch.equal(h0, h1)
    assert y1.requires_grad and not y0.requires_grad


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_default_initial_state_is_not_saved_as_a_block(mode, device):
    """Without hx the module's zero state is one expanded zero, so autograd keeps no
    [layers * dirs, B, H] block for it (the state a training step saves for backward)."""
    T, B, I, H = 3, 7, 3, 5  # no saved tensor but a state has B * H or 4 * B * H elements
    m = getattr(rnnext, mode)(I, H, num_layers=2, bidirectional=True, device=device)
    x = torch.randn(T, B, I).to(device).requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = m(x)
    one_state, all_states = 4 * B * H, 4 * 4 * B * H  # bytes (float32; 2 layers x 2 directions)
    assert sizes, "nothing was saved for backward"
    assert one_state not in sizes and all_states not in sizes, sizes
    # Output, input gradient and every parameter gradient are torch.nn's (no hx there either).
    ref = getattr(torch.nn, mode)(I, H, num_layers=2, bidirectional=True, device=device)
    ref.load_state_dict(m.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    y_ref, _ = ref(x_ref)
    tol = tolerance(y.device, y.dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=lambda msg: f"{name}: {msg}")

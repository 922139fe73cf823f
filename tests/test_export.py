"""Graph capture other than torch.compile (test_compile.py): torch.export (eval and train, batch
and time dynamic, saved and loaded), torch.jit.trace (passes its own check, new shapes, trains,
also when traced without grad) and torch.jit.script (a clear error naming the routes that work;
to_torch first makes a model scriptable)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import rnnext
from helpers import CELL_KINDS, CELLS, F64, make_inputs, make_pair, module_classes

# torch 2.13 marks TorchScript deprecated; what is tested here is that it works meanwhile.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

LAYER_KINDS = [pytest.param(c, id=c) for c in CELLS] + [pytest.param("LSTM-proj", id="LSTM-proj")]


def _pair(kind: str, device: str):
    cell, kwargs = ("LSTM", dict(proj_size=3)) if kind == "LSTM-proj" else (kind, {})
    return make_pair(cell, 4, 6, dtype=F64, num_layers=2, bidirectional=True, device=device, **kwargs)


def _grads(module, x):
    """Output, and the gradients of x and every parameter, of a weighted sum of the output."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = module(x)[0]
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


def _assert_same(got, expected, what):
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12, msg=lambda m: f"{what} [{i}]: {m}")


# ============================================================================ torch.export
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_export_dynamic_batch_and_time(kind, training, device, tmp_path):
    """Exported with batch and time dynamic, the program gives the eager module's outputs (and,
    in training mode, gradients) on other shapes, also after torch.export.save / load."""
    ref, ours = _pair(kind, device)
    ours.train(training)
    x, _ = make_inputs(ours, seq_len=5, batch=3)
    dims = {"input": {0: torch.export.Dim("T", min=2, max=64), 1: torch.export.Dim("B", min=2, max=64)}}
    program = torch.export.export(ours, (x,), dynamic_shapes=dims)
    path = tmp_path / "program.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)  # rnnext's ops are registered in this process (import rnnext)
    for seq_len, batch in ((7, 2), (3, 9)):
        x_new, _ = make_inputs(ours, seq_len=seq_len, batch=batch, seed=seq_len)
        if training:
            # an exported program's module holds the parameters; load the eager ones for gradients
            for runnable in (program.module(), loaded.module()):
                runnable.load_state_dict(ours.state_dict())
                _assert_same(_grads(runnable, x_new), _grads(ours, x_new), f"{kind} train {seq_len}x{batch}")
        else:
            expected = ours(x_new)
            for runnable in (program.module(), loaded.module()):
                got = runnable(x_new)
                _assert_same(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected),
                             f"{kind} eval {seq_len}x{batch}")


# ============================================================================ torch.jit.trace
def _trace(module, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, x)  # check_trace=True: two traces must agree


@pytest.mark.parametrize("traced_without_grad", [False, True], ids=["traced", "traced-no-grad"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_trace_checks_generalises_and_trains(kind, traced_without_grad, device):
    """A traced layer passes trace's default check, gives the eager results on a new batch
    size and sequence length, and trains (gradients equal eager's), even when traced under
    no_grad."""
    _, ours = _pair(kind, device)
    x, _ = make_inputs(ours, seq_len=5, batch=3)
    with torch.set_grad_enabled(not traced_without_grad):
        traced = _trace(ours, x)
    x_new, _ = make_inputs(ours, seq_len=8, batch=2, seed=4)
    _assert_same(_grads(traced, x_new), _grads(ours, x_new), f"traced {kind}")
    with torch.no_grad():
        _assert_same(torch.utils._pytree.tree_leaves(traced(x_new)), torch.utils._pytree.tree_leaves(ours(x_new)),
                     f"traced {kind} no_grad")


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_trace_cells(kind, device):
    _, ours = make_pair(kind, 4, 6, dtype=F64, device=device)
    x = torch.randn(3, 4, dtype=F64, device=device)
    traced = _trace(ours, x)
    x_new = torch.randn(5, 4, dtype=F64, device=device, requires_grad=True)
    got, expected = traced(x_new), ours(x_new)
    for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    torch.autograd.grad(sum(t.sum() for t in torch.utils._pytree.tree_leaves(got)), x_new)


# ============================================================================ torch.jit.script
class _Model(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(6, 2, dtype=F64)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("kind", CELLS + ("RNNCell_tanh", "LSTMCell"))
def test_script_fails_with_the_routes_that_work(kind):
    """torch.jit.script of a model holding an rnnext layer: a RuntimeError naming the module
    and the routes that work, not a TorchScript parse error."""
    _, ours = make_pair(kind, 4, 6, dtype=F64)
    with pytest.raises(RuntimeError) as info:
        torch.jit.script(_Model(ours) if kind in CELLS else ours)
    message = str(info.value)
    assert f"rnnext.{type(ours).__name__} cannot be compiled with torch.jit.script" in message
    for route in ("torch.jit.trace", "torch.export", "torch.compile", "rnnext.to_torch"):
        assert route in message


def test_to_torch_makes_a_model_scriptable():
    _, ours = make_pair("GRU", 4, 6, dtype=F64)
    model = _Model(ours)
    x = torch.randn(5, 3, 4, dtype=F64)
    expected = model(x)
    scripted = torch.jit.script(rnnext.to_torch(model))
    assert type(model.rnn) is module_classes("GRU")[0]
    torch.testing.assert_close(scripted(x), expected, rtol=0, atol=1e-12)

"""The layer ops called directly through torch.ops.rnnext: finite-difference gradient checks
(torch.autograd.gradcheck, float64) and torch.library.opcheck (schema, fake kernels,
autograd registration, AOT dispatch) for every forward and backward op, on the CPU and on
CUDA. Arguments: helpers.op_args (tiny sizes: gradcheck perturbs every input element one at
a time)."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.profiler import ProfilerActivity, profile

import rnnext  # noqa: F401  (registers the ops)
from helpers import OP_CELLS, backward_args, backward_op, forward_op, op_args, tolerance, torch_layer_grads

OPS = OP_CELLS


def differentiable_outputs(cell):
    """The op without its last output (the workspace, which is not differentiable)."""
    op = forward_op(cell)

    def f(*args):
        return op(*args)[:-1]

    return f


def _cases():
    for cell in OPS:
        projs = (False, True) if cell == "lstm" else (False,)
        for bias, reverse, proj in itertools.product((False, True), (False, True), projs):
            yield pytest.param(cell, bias, reverse, proj,
                               id=f"{cell}-{'bias' if bias else 'nobias'}-{'rev' if reverse else 'fwd'}"
                                  + ("-proj" if proj else ""))


CASES = list(_cases())


@pytest.mark.parametrize("cell,bias,reverse,proj", CASES)
def test_gradcheck_forward_op(cell, bias, reverse, proj, device):
    args = op_args(cell, bias=bias, reverse=reverse, proj=proj, device=device)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    # Every tensor input (x, h0, c0, all weights) takes part in the check.
    expected = 4 + (2 if bias else 0) + (1 if cell == "lstm" else 0) + (1 if proj else 0)
    assert len(tensors) == expected and all(t.requires_grad for t in tensors)
    assert all(t.device.type == torch.device(device).type for t in tensors)
    assert gradcheck(differentiable_outputs(cell), args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("cell,bias,reverse,proj", CASES)
def test_gradcheck_uses_the_backward_op(cell, bias, reverse, proj, device):
    """First-order gradients come from the C++ backward op (not the torch-op fallback used
    for create_graph=True), so the gradcheck above does check the hand-written BPTT."""
    args = op_args(cell, bias=bias, reverse=reverse, proj=proj, device=device)
    outs = differentiable_outputs(cell)(*args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(sum(o.sum() for o in outs), [a for a in args if isinstance(a, torch.Tensor)])
    names = {e.name for e in prof.events()}
    assert f"rnnext::{cell}_layer_backward" in names


@pytest.mark.parametrize("cell", OPS)
def test_gradcheck_wrt_subset_of_inputs(cell, device):
    """Only some inputs require grad (the others' gradients must simply be skipped)."""
    args = list(op_args(cell, bias=True, reverse=True, proj=cell == "lstm", requires_grad=False, device=device))
    args[0].requires_grad_(True)  # x
    args[3 if cell == "lstm" else 2].requires_grad_(True)  # w_ih
    assert gradcheck(differentiable_outputs(cell), tuple(args), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("cell", OPS)
def test_gradgradcheck_forward_op(cell, device):
    """Second order (create_graph=True) through the op's autograd formula."""
    args = op_args(cell, bias=True, reverse=True, proj=cell == "lstm", device=device)
    assert gradgradcheck(differentiable_outputs(cell), args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cell", OPS)
def test_workspace_is_not_differentiable(cell, device):
    args = op_args(cell, bias=True, reverse=False, device=device)
    outs = forward_op(cell)(*args)
    assert all(o.requires_grad for o in outs[:-1])
    assert not outs[-1].requires_grad


# ---------------------------------------------------------------- opcheck
def _opcheck_ok(result):
    assert result, "opcheck returned nothing"
    assert all(v == "SUCCESS" for v in result.values()), result


FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("cell,proj", [(c, False) for c in OPS] + [("lstm", True)])
def test_one_step_2d_input(cell, proj, device):
    """Without batch_sizes a 2-D x [B, I] is one step (how the *Cell modules call the ops): y
    is [B, Hout]; gradcheck, opcheck of both ops, and the same bits as the one-step sequence
    x[None]."""
    args = op_args(cell, proj=proj, one_step=True, device=device)
    assert args[0].dim() == 2
    assert gradcheck(differentiable_outputs(cell), args, eps=1e-6, atol=1e-8, rtol=1e-6)
    _opcheck_ok(torch.library.opcheck(forward_op(cell), args, test_utils=FAST_UTILS))
    bargs = backward_args(cell, proj=proj, one_step=True, device=device)
    _opcheck_ok(torch.library.opcheck(backward_op(cell), bargs, test_utils=("test_schema", "test_faketensor")))
    with torch.no_grad():
        flat = forward_op(cell)(*args)
        seq = forward_op(cell)(args[0][None], *args[1:])
    assert flat[0].shape == seq[0].shape[1:]
    assert torch.equal(flat[0], seq[0][0])
    assert all(torch.equal(a, b) for a, b in zip(flat[1:], seq[1:]))


@pytest.mark.parametrize("cell,bias,reverse,proj", CASES)
def test_opcheck_forward_fast(cell, bias, reverse, proj, device):
    args = op_args(cell, bias=bias, reverse=reverse, proj=proj, device=device)
    _opcheck_ok(torch.library.opcheck(forward_op(cell), args, test_utils=FAST_UTILS))


# The AOT-dispatch check traces forward and backward and is slower (~0.5 s a case): every op
# with bias, reversed, plus LSTM's projection with and without bias.
AOT_CASES = [c for c in CASES if c.values[2] and (c.values[1] or c.values[3])]


@pytest.mark.parametrize("cell,bias,reverse,proj", AOT_CASES)
def test_opcheck_forward_aot_dispatch(cell, bias, reverse, proj, device):
    args = op_args(cell, bias=bias, reverse=reverse, proj=proj, device=device)
    _opcheck_ok(torch.library.opcheck(forward_op(cell), args, test_utils="test_aot_dispatch_dynamic"))


# The backward ops have no autograd formula of their own (they are not differentiated:
# double backward takes the torch-op path), so test_autograd_registration is left out.
@pytest.mark.parametrize("cell,bias,reverse,proj", CASES)
def test_opcheck_backward_fast(cell, bias, reverse, proj, device):
    args = backward_args(cell, bias=bias, reverse=reverse, proj=proj, device=device)
    _opcheck_ok(torch.library.opcheck(backward_op(cell), args, test_utils=("test_schema", "test_faketensor")))


@pytest.mark.parametrize("cell,bias,reverse,proj", AOT_CASES)
def test_opcheck_backward_aot_dispatch(cell, bias, reverse, proj, device):
    args = backward_args(cell, bias=bias, reverse=reverse, proj=proj, device=device)
    _opcheck_ok(torch.library.opcheck(backward_op(cell), args, test_utils="test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("cell,bias,reverse,proj", CASES)
def test_backward_op_matches_torch(cell, bias, reverse, proj, device):
    """Every gradient the backward op returns equals torch.nn's through autograd (same weights,
    same output gradients, float64), in its input's shape, dtype and device; a missing
    bias/projection gets [0]."""
    fwd = op_args(cell, bias=bias, reverse=reverse, proj=proj, requires_grad=False, device=device)
    args = backward_args(cell, bias=bias, reverse=reverse, proj=proj, device=device)
    grads = backward_op(cell)(*args)
    grad_c_n = args[2] if cell == "lstm" else None
    expected = torch_layer_grads(cell, fwd, args[0], args[1], grad_c_n)
    assert len(grads) == len(expected)
    for i, (g, e) in enumerate(zip(grads, expected)):
        assert g.shape == e.shape and g.dtype == e.dtype and g.device == e.device, (i, g.shape, e.shape)
        torch.testing.assert_close(g, e, **tolerance(g.device, g.dtype), msg=lambda m: f"output {i}: {m}")


# need_grad_x / need_grad_weights / need_grad_h0: a gradient not asked for comes back as [0]
# and its GEMM is skipped; the gradients that are asked for have the same bits as with
# everything asked for.
MASKS = [(False, True, True), (True, False, True), (False, False, True), (True, True, False),
         (False, False, False)]
MASK_CASES = [(c, m) for c in (x.values for x in CASES) for m in MASKS]


def _mask_id(case):
    (cell, bias, reverse, proj), (need_x, need_w, need_h0) = case
    return f"{cell}-{'bias' if bias else 'nobias'}-{'rev' if reverse else 'fwd'}{'-proj' if proj else ''}" \
           f"-x{int(need_x)}w{int(need_w)}h{int(need_h0)}"


@pytest.mark.parametrize("case", MASK_CASES, ids=[_mask_id(c) for c in MASK_CASES])
def test_backward_op_skips_gradients_not_asked_for(case, device):
    (cell, bias, reverse, proj), (need_x, need_w, need_h0) = case
    args = backward_args(cell, bias=bias, reverse=reverse, proj=proj, device=device)
    full = backward_op(cell)(*args)
    masked = backward_op(cell)(*args, need_x, need_w, need_h0)
    # Positions: grad_x, grad_h0, (grad_c0,) then the weight and bias gradients.
    n_states = 2 if cell == "lstm" else 1
    for i, (f, m) in enumerate(zip(full, masked)):
        wanted = need_x if i == 0 else need_h0 if i == 1 else (True if i <= n_states else need_w)
        if wanted:
            assert torch.equal(f, m), i
        else:
            assert m.shape == (0,), i
    _opcheck_ok(torch.library.opcheck(backward_op(cell), args + (need_x, need_w, need_h0),
                                      test_utils=("test_schema", "test_faketensor")))


# ---------------------------------------------------------------- the graph node
ABSENT_CASES = [(c, p, s) for c, p in [(c, False) for c in OPS] + [("lstm", True)] for s in (False, True)]


@pytest.mark.parametrize("cell,proj,one_step", ABSENT_CASES)
def test_backward_op_takes_absent_output_grads(cell, proj, one_step, device):
    """An output gradient may be None, meaning zero: what autograd passes for an output nothing
    used (a *Cell's y, a layer's h_n). Every combination gives the same bits as zeros, and
    passes opcheck's schema and fake-kernel checks."""
    args = backward_args(cell, proj=proj, reverse=True, one_step=one_step, device=device)
    n_grads = 3 if cell == "lstm" else 2
    for absent in itertools.chain.from_iterable(itertools.combinations(range(n_grads), k)
                                                for k in range(1, n_grads + 1)):
        zeros, nones = list(args), list(args)
        for i in absent:
            zeros[i], nones[i] = torch.zeros_like(args[i]), None
        expected = backward_op(cell)(*zeros)
        got = backward_op(cell)(*nones)
        assert all(torch.equal(e, g) for e, g in zip(expected, got)), absent
        _opcheck_ok(torch.library.opcheck(backward_op(cell), tuple(nones),
                                          test_utils=("test_schema", "test_faketensor")))


def test_graph_node_keeps_saved_values_as_torch_does(device):
    """The forward's node saves like torch's own: a second backward without retain_graph and a
    saved input modified in place both raise torch's errors, not a wrong gradient."""
    args = op_args("lstm", proj=True, device=device)
    outs = differentiable_outputs("lstm")(*args)
    assert outs[0].grad_fn is outs[1].grad_fn and outs[0].grad_fn.name() == "LstmLayerBackward"
    loss = sum(o.sum() for o in outs)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    outs = differentiable_outputs("lstm")(*args)
    with torch.no_grad():
        args[3].add_(1.0)  # w_ih
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sum(o.sum() for o in outs).backward()


def test_forward_mode_ad_is_refused(device):
    """The ops have no forward-mode formula: a dual input raises NotImplementedError naming the
    op, never a tangent silently dropped."""
    import torch.autograd.forward_ad as fwAD

    args = list(op_args("gru", requires_grad=False, device=device))
    with fwAD.dual_level():
        args[0] = fwAD.make_dual(args[0], torch.ones_like(args[0]))
        with pytest.raises(NotImplementedError, match="rnnext::gru_layer_forward has no forward-mode AD"):
            forward_op("gru")(*args)

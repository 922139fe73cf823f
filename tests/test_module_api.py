"""The module surface matches torch.nn's: constructor signature and checks (exception types
and messages), parameter names, shapes and order, repr, all_weights, _flat_weights_names,
and the exceptions raised for malformed forward inputs."""
from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rnnext
from helpers import CELLS, F64, make_inputs, make_pair, raised, tolerance, weighted_loss

API_CONFIGS = [
    pytest.param(cell, dict(num_layers=nl, bias=bias, bidirectional=bi, batch_first=bf),
                 id=f"{cell}-L{nl}-{'bias' if bias else 'nobias'}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}")
    for cell, nl, bias, bi, bf in itertools.product(CELLS, (1, 3), (True, False), (False, True), (False, True))
] + [
    pytest.param("LSTM", dict(num_layers=nl, bias=bias, bidirectional=bi, proj_size=ps),
                 id=f"LSTM-P{ps}-L{nl}-{'bias' if bias else 'nobias'}-{'bi' if bi else 'uni'}")
    for nl, bias, bi, ps in itertools.product((1, 2), (True, False), (False, True), (1, 4))
] + [
    pytest.param("GRU", dict(num_layers=2, dropout=0.25), id="GRU-dropout"),
    pytest.param("RNN_RELU", dict(num_layers=2, dropout=0.5, bidirectional=True), id="RNN_RELU-dropout"),
    pytest.param("LSTM", dict(num_layers=3, dropout=1.0, proj_size=2, batch_first=True, bias=False), id="LSTM-all"),
]


def build(cell, kwargs, input_size=3, hidden_size=5, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_pair(cell, input_size, hidden_size, dtype=dtype, **kwargs)


@pytest.mark.parametrize("cell,kwargs", API_CONFIGS)
def test_parameter_names_shapes_and_order(cell, kwargs):
    ref, ours = build(cell, kwargs)
    expected = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in ref.named_parameters()]
    got = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in ours.named_parameters()]
    assert got == expected
    assert all(isinstance(p, nn.Parameter) for p in ours.parameters())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert list(ours.buffers()) == list(ref.buffers()) == []


@pytest.mark.parametrize("cell,kwargs", API_CONFIGS)
def test_repr_and_config_attributes(cell, kwargs):
    ref, ours = build(cell, kwargs)
    assert repr(ours) == repr(ref)
    assert ours.extra_repr() == ref.extra_repr()
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
        assert type(getattr(ours, attr)) is type(getattr(ref, attr)), attr
    if cell.startswith("RNN"):
        assert ours.nonlinearity == ref.nonlinearity


@pytest.mark.parametrize("cell,kwargs", API_CONFIGS)
def test_all_weights_and_flat_weights(cell, kwargs):
    ref, ours = build(cell, kwargs)
    assert ours._flat_weights_names == ref._flat_weights_names
    assert ours._all_weights == ref._all_weights
    # all_weights: per layer and direction, the parameters themselves, in torch.nn's order
    assert len(ours.all_weights) == len(ref.all_weights)
    for names, ours_group, ref_group in zip(ours._all_weights, ours.all_weights, ref.all_weights):
        assert [tuple(p.shape) for p in ours_group] == [tuple(p.shape) for p in ref_group]
        assert all(p is getattr(ours, n) for n, p in zip(names, ours_group))
    assert len(ours._flat_weights) == len(ref._flat_weights)
    assert all(p is getattr(ours, n) for n, p in zip(ours._flat_weights_names, ours._flat_weights))


def test_all_weights_follow_reassigned_parameters():
    ours = rnnext.LSTM(3, 4, num_layers=2)
    new = nn.Parameter(torch.zeros_like(ours.weight_hh_l1))
    ours.weight_hh_l1 = new
    assert ours.all_weights[1][1] is new
    assert ours._flat_weights[ours._flat_weights_names.index("weight_hh_l1")] is new


@pytest.mark.parametrize("cls", [rnnext.RNN, rnnext.LSTM, rnnext.GRU])
def test_flatten_parameters_is_a_harmless_no_op(cls):
    torch.manual_seed(0)
    m = cls(3, 4, num_layers=2, bidirectional=True)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x = torch.randn(5, 2, 3)
    out_before = m(x)[0]
    assert m.flatten_parameters() is None
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])
    torch.testing.assert_close(m(x)[0], out_before, rtol=0, atol=0)


def test_positional_arguments_as_torch():
    """LSTM(input, hidden, num_layers, bias, batch_first, dropout, bidirectional, proj_size)
    and RNN(input, hidden, num_layers, nonlinearity, bias, ...), positionally."""
    args = (3, 5, 2, False, True, 0.0, True, 2)
    ref, ours = nn.LSTM(*args), rnnext.LSTM(*args)
    assert repr(ours) == repr(ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    args = (3, 5, 2, "relu", False, True)
    ref, ours = nn.RNN(*args), rnnext.RNN(*args)
    assert ours.mode == ref.mode == "RNN_RELU"
    assert repr(ours) == repr(ref)
    assert ours.batch_first is True and ours.bias is False
    args = (3, 5, 3, True, True, 0.1, True)
    ref, ours = nn.GRU(*args), rnnext.GRU(*args)
    assert repr(ours) == repr(ref)


@pytest.mark.parametrize("cls", [rnnext.RNN, rnnext.LSTM, rnnext.GRU])
def test_device_and_dtype_factory_kwargs(cls, device):
    m = cls(3, 4, num_layers=2, device=device, dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == device for p in m.parameters())


@pytest.mark.parametrize("cell", CELLS)
def test_deepcopy_and_state_dict_round_trip(cell, tmp_path, device):
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True, device=device)
    x, hx = make_inputs(ref, with_hx=True)
    clone = copy.deepcopy(ours)
    assert clone.weight_ih_l0.device == ours.weight_ih_l0.device
    torch.testing.assert_close(clone(x, hx)[0], ref(x, hx)[0], **tolerance(device, F64))
    path = tmp_path / "sd.pt"
    torch.save(ours.state_dict(), path)
    _, fresh = make_pair(cell, num_layers=2, bidirectional=True, seed=99, device=device)
    fresh.load_state_dict(torch.load(path))
    torch.testing.assert_close(fresh(x, hx)[0], ref(x, hx)[0], **tolerance(device, F64))


# ---------------------------------------------------------------- constructor errors
CTOR_ERRORS = [
    ("RNN", (4, 5), dict(nonlinearity="sigmoid")),
    ("RNN", (4, 5, 1, "gelu"), {}),
    ("RNN", (4, 5), dict(nonlinearity="Tanh")),
    ("LSTM", (4, 5), dict(dropout=-0.1)),
    ("LSTM", (4, 5), dict(dropout=1.5)),
    ("GRU", (4, 5), dict(dropout=True)),
    ("GRU", (4, 5), dict(dropout="0.5")),
    ("RNN", (4, 5), dict(dropout=None)),
    ("LSTM", (4, 0), {}),
    ("GRU", (4, -1), {}),
    ("RNN", (4, 0), {}),
    ("LSTM", (0, 5), {}),
    ("LSTM", (4, 5), dict(num_layers=0)),
    ("GRU", (4, 5), dict(num_layers=-2)),
    ("LSTM", (4, 5), dict(proj_size=5)),
    ("LSTM", (4, 5), dict(proj_size=6)),
    ("LSTM", (4, 5), dict(proj_size=-1)),
    ("GRU", (4, 5), dict(proj_size=2)),
    ("RNN", (4, 5), dict(proj_size=2)),
    ("GRU", (4, 5), dict(proj_size=0)),
    ("RNN", (4, 5), dict(proj_size=0)),
    ("LSTM", (4, 5), dict(bias=1)),
    ("LSTM", (4, 5), dict(batch_first=None)),
    ("LSTM", (4.0, 5), {}),
    ("GRU", (4, 5.0), {}),
    ("LSTM", (4, 5), dict(bogus=1)),
    ("LSTM", (4, 5, 1, True, False, 0.0, False, 0, None, None, 1), {}),
]


def _raise_info(fn):
    """(type, message) of the exception fn raises, or (None, None)."""
    exc = raised(fn)
    return (None, None) if exc is None else (type(exc), str(exc))


@pytest.mark.parametrize("name,args,kwargs", CTOR_ERRORS,
                         ids=[f"{n}-{a}-{k}" for n, a, k in CTOR_ERRORS])
def test_constructor_errors_match_torch(name, args, kwargs):
    """The exception type and message of the torch.nn at hand (older torch.nn accepts some of
    these, e.g. input_size=0 in torch 2.4: then rnnext accepts them too)."""
    expected = _raise_info(lambda: getattr(nn, name)(*args, **kwargs))
    got = _raise_info(lambda: getattr(rnnext, name)(*args, **kwargs))
    assert got == expected


def test_non_int_num_layers_is_a_type_error():
    # torch.nn fails with a TypeError from range(); rnnext checks it up front (same type).
    expected = _raise_info(lambda: nn.LSTM(4, 5, num_layers=2.0))
    got = _raise_info(lambda: rnnext.LSTM(4, 5, num_layers=2.0))
    assert expected[0] is TypeError and got[0] is TypeError


# ---------------------------------------------------------------- forward input errors
def _pair(name, **kw):
    return make_pair(name, 4, 5, dtype=torch.float32, **kw)


FORWARD_ERRORS = [
    ("LSTM", {}, lambda: (torch.randn(5, 3, 4, 1),), "4-D input"),
    ("GRU", {}, lambda: (torch.randn(5, 3, 4, 1),), "4-D input"),
    ("RNN", {}, lambda: (torch.randn(4),), "1-D input"),
    ("LSTM", {}, lambda: (torch.randn(5, 3, 6),), "wrong input_size"),
    ("RNN", {}, lambda: (torch.randn(5, 6),), "wrong input_size unbatched"),
    ("LSTM", {}, lambda: (torch.randn(5, 3, 4, dtype=torch.float64),), "input dtype"),
    ("GRU", {}, lambda: (torch.randn(5, 3, 4, dtype=torch.float16),), "input dtype half"),
    ("LSTM", {}, lambda: (torch.randn(5, 3, 4), (torch.randn(1, 2, 5), torch.randn(1, 3, 5))), "h0 batch"),
    ("LSTM", {}, lambda: (torch.randn(5, 3, 4), (torch.randn(1, 3, 5), torch.randn(1, 3, 4))), "c0 size"),
    ("LSTM", dict(proj_size=2), lambda: (torch.randn(5, 3, 4), (torch.randn(1, 3, 5), torch.randn(1, 3, 5))),
     "h0 size with proj"),
    ("GRU", {}, lambda: (torch.randn(5, 3, 4), torch.randn(2, 3, 5)), "hx layers"),
    ("RNN", dict(bidirectional=True), lambda: (torch.randn(5, 3, 4), torch.randn(1, 3, 5)), "hx directions"),
    ("RNN", {}, lambda: (torch.randn(5, 3, 4), torch.randn(1, 5)), "2-D hx for batched input"),
    ("RNN", {}, lambda: (torch.randn(5, 4), torch.randn(1, 1, 5)), "3-D hx for unbatched input"),
    ("LSTM", {}, lambda: (torch.randn(5, 4), (torch.randn(1, 1, 5), torch.randn(1, 1, 5))),
     "3-D hx for unbatched LSTM"),
    ("LSTM", {}, lambda: (torch.randn(5, 3, 4), (torch.randn(1, 3, 5), torch.randn(3, 5))), "2-D c0"),
    ("LSTM", {}, lambda: (torch.randn(0, 3, 4),), "zero steps"),
    ("GRU", {}, lambda: (torch.randn(0, 3, 4),), "zero steps"),
    ("LSTM", dict(num_layers=2), lambda: (torch.randn(5, 3, 4), torch.randn(2, 3, 5)), "hx as one tensor, 2 layers"),
]


@pytest.mark.parametrize("name,kwargs,inputs,desc", FORWARD_ERRORS,
                         ids=[f"{n}-{d}" for n, _, _, d in FORWARD_ERRORS])
def test_forward_errors_match_torch(name, kwargs, inputs, desc):
    ref, ours = _pair(name, **kwargs)
    args = inputs()
    expected = _raise_info(lambda: ref(*args))
    got = _raise_info(lambda: ours(*args))
    assert expected[0] is not None, "torch.nn accepted it: not an error case"
    assert got[0] is expected[0], (got, expected)


def test_lstm_hx_as_one_tensor_error_type_matches_torch():
    """A common mistake: passing only h0 to a one-layer LSTM. torch.nn fails with IndexError
    (it indexes hx[1] on a tensor whose first dimension is 1); rnnext must raise the same type
    so that code catching it keeps working."""
    ref, ours = _pair("LSTM")
    x, h0 = torch.randn(5, 3, 4), torch.randn(1, 3, 5)
    expected = _raise_info(lambda: ref(x, h0))
    got = _raise_info(lambda: ours(x, h0))
    assert expected[0] is IndexError
    assert got[0] is expected[0], (got, expected)


@pytest.mark.parametrize("name", ["RNN", "GRU", "LSTM"])
def test_zero_batch_is_accepted_like_torch(name):
    ref, ours = _pair(name)
    x = torch.randn(5, 0, 4)
    def flat(out):  # (output, h_n) or (output, (h_n, c_n)) -> a list of tensors
        y, state = out
        return [y, *(state if isinstance(state, tuple) else (state,))]

    expected, got = flat(ref(x)), flat(ours(x))
    assert [t.shape for t in got] == [t.shape for t in expected]
    assert got[0].shape == (5, 0, 5)
    sum(t.sum() for t in got).backward()
    sum(t.sum() for t in expected).backward()
    for p, p_ref in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p.grad, p_ref.grad)  # zeros of the parameter's shape


def test_replaced_parameter_of_wrong_shape_is_reported_by_name():
    ours = rnnext.GRU(4, 5, num_layers=2)
    ours.weight_hh_l1 = nn.Parameter(torch.randn(15, 4))
    with pytest.raises(RuntimeError, match="weight_hh_l1"):
        ours(torch.randn(3, 2, 4))


# ---------------------------------------------------------------- gradients not asked for
class _BackwardOpFlags(TorchDispatchMode):
    """Records (need_grad_x, need_grad_weights) of every rnnext backward-op call."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.h0_flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "rnnext" in str(func) and "layer_backward" in str(func):
            # Arguments left at their defaults (True) may not be passed.
            given = dict(zip([a.name for a in func._schema.arguments], args), **(kwargs or {}))
            self.calls.append((given.get("need_grad_x", True), given.get("need_grad_weights", True)))
            self.h0_flags.append(given.get("need_grad_h0", True))
        return func(*args, **(kwargs or {}))


def test_state_that_is_data_skips_its_gradient(device):
    """hx that is data (or absent): the backward op is told need_grad_h0=False, and every
    gradient that is asked for still matches torch.nn."""
    ref, ours = make_pair("GRU", 5, 7, dtype=F64, via="from_torch", device=device, num_layers=2)
    x = torch.randn(4, 3, 5, dtype=F64).to(device)
    h0 = torch.randn(2, 3, 7, dtype=F64).to(device)
    grads = []
    for m in (ref, ours):
        with _BackwardOpFlags() as flags:
            weighted_loss([m(x, h0)[0]]).backward()
        grads.append([p.grad for p in m.parameters()])
    assert flags.h0_flags == [False, False]
    for r, o in zip(*grads):
        torch.testing.assert_close(o, r, **tolerance(device, F64))


# The backward op computes grad_x only when the input requires grad, and the weight
# gradients only when a weight does (need_grad_x / need_grad_weights): an input that is data,
# and frozen weights, skip their GEMMs. What is asked for still matches torch.nn.
@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_gradients_only_where_asked(kind, frozen, device):
    ref, ours = make_pair(kind, 5, 7, dtype=F64, via="from_torch", device=device, num_layers=2,
                          bidirectional=True)
    for p in list(ref.parameters()) + list(ours.parameters()):
        p.requires_grad_(not frozen)
    x = torch.randn(4, 3, 5, dtype=F64).to(device).requires_grad_(frozen)  # data, unless frozen
    h0 = torch.randn(4, 3, 7, dtype=F64).to(device).requires_grad_()
    hx = (h0, torch.randn(4, 3, 7, dtype=F64).to(device)) if kind == "LSTM" else h0
    grads = []
    for m in (ref, ours):
        for t in (x, h0):
            t.grad = None
        out = m(x, hx)[0]
        with _BackwardOpFlags() as flags:
            weighted_loss([out]).backward()
        grads.append([x.grad, h0.grad] + [p.grad for p in m.parameters()])
    # (need_grad_x, need_grad_weights) per backward call, last layer first: layer 0 (2 calls)
    # reads x, which only a frozen model differentiates; layer 1's input always needs a grad.
    assert sorted(flags.calls[:2]) == [(True, not frozen)] * 2
    assert sorted(flags.calls[2:]) == [(frozen, not frozen)] * 2
    assert flags.h0_flags == [True] * 4  # h0 requires grad: every layer's slice does
    for name, r, o in zip(["x", "h0"] + [n for n, _ in ref.named_parameters()], *grads):
        assert (r is None) == (o is None), name
        if r is not None:
            torch.testing.assert_close(o, r, **tolerance(device, F64), msg=name)
    assert (x.grad is None) != frozen

"""Whole-model conversion: rnnext.convert (torch.nn -> rnnext, in place), rnnext.to_torch (the
inverse), from_torch's per-parameter requires_grad, and rnnext.is_recurrent (isinstance for
torch.nn's recurrent classes that also accepts rnnext's)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rnnext
from helpers import F64, make_inputs


class _Model(nn.Module):
    """Recurrent layers deep inside: a bidirectional projected LSTM encoder, cells in a
    ModuleList (one of them also held under a second name), a ReLU RNN in a Sequential."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(4, 8, num_layers=2, bidirectional=True, proj_size=3, batch_first=True,
                               dtype=F64)
        self.cells = nn.ModuleList([nn.GRUCell(6, 6, dtype=F64), nn.RNNCell(6, 6, nonlinearity="relu", dtype=F64),
                                    nn.LSTMCell(6, 6, dtype=F64)])
        self.same_cell = self.cells[0]
        self.tail = nn.Sequential(nn.RNN(6, 5, nonlinearity="relu", dtype=F64), nn.Identity())
        self.gru = nn.GRU(5, 2, bias=False, dtype=F64)

    def forward(self, x):
        y, _ = self.encoder(x)  # [B, T, 6]
        h = y[:, -1]
        h = self.cells[1](self.same_cell(h), h)
        h, _ = self.cells[2](h)
        y, _ = self.tail[0](y.transpose(0, 1) + h)
        return self.gru(y)[0].sum(0)


RECURRENT = {"encoder": nn.LSTM, "cells.0": nn.GRUCell, "cells.1": nn.RNNCell, "cells.2": nn.LSTMCell,
             "tail.0": nn.RNN, "gru": nn.GRU}


def test_convert_replaces_every_layer_in_place_and_keeps_everything():
    torch.manual_seed(0)
    model = _Model()
    model.encoder.weight_hh_l0.requires_grad_(False)
    model.eval()
    calls = []
    handle = model.gru.register_forward_hook(lambda mod, args, out: calls.append(type(mod)))
    reference = copy.deepcopy(model)
    params_before = dict(model.named_parameters())
    x = torch.randn(3, 7, 4, dtype=F64)
    expected = reference(x)

    assert rnnext.convert(model) is model
    for name, torch_cls in RECURRENT.items():
        module = model.get_submodule(name)
        assert type(module) is getattr(rnnext, torch_cls.__name__), name
        assert rnnext.is_recurrent(module, torch_cls)
        assert not module.training, f"{name} lost eval mode"
    assert model.same_cell is model.cells[0], "a module held twice must stay one module"
    assert model.cells[1].nonlinearity == "relu" and model.tail[0].nonlinearity == "relu"
    assert model.encoder.proj_size == 3 and model.encoder.batch_first and not model.gru.bias
    # the very same Parameter objects: dtype, device, requires_grad and optimizers carry over
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys()
    assert all(after[k] is params_before[k] for k in after)
    assert not model.encoder.weight_hh_l0.requires_grad
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    assert calls == [nn.GRU, rnnext.GRU], "the forward hook moved with the layer"
    handle.remove()
    model(x)
    assert len(calls) == 2, "the hook's handle still removes it"
    model.load_state_dict(reference.state_dict())  # state_dicts are interchangeable


def test_optimizer_built_before_convert_still_trains():
    """An optimizer (with momentum state) built on the torch.nn model keeps updating the
    converted model's parameters exactly as it updates torch.nn's."""
    torch.manual_seed(1)
    model = _Model()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 7, 4, dtype=F64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, reference)]
    for step in range(3):
        if step == 1:
            rnnext.convert(model)
        for m, opt in zip((model, reference), opts):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    assert type(model.encoder) is rnnext.LSTM
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_to_torch_is_the_inverse():
    torch.manual_seed(2)
    model = _Model()
    params = dict(model.named_parameters())
    x = torch.randn(3, 7, 4, dtype=F64)
    expected = model(x)
    rnnext.to_torch(rnnext.convert(model))
    for name, torch_cls in RECURRENT.items():
        assert type(model.get_submodule(name)) is torch_cls, name
    assert all(p is params[k] for k, p in model.named_parameters())
    assert model.same_cell is model.cells[0]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    # torch.nn's layer works from the shared parameters (its _flat_weights follow them)
    with torch.no_grad():
        model.gru.weight_ih_l0.mul_(2)
    ref = nn.GRU(5, 2, bias=False, dtype=F64)
    ref.load_state_dict(model.gru.state_dict())
    y = torch.randn(4, 2, 5, dtype=F64)
    torch.testing.assert_close(model.gru(y)[0], ref(y)[0], rtol=0, atol=0)


def test_a_layer_itself_is_returned_converted():
    lstm = nn.LSTM(3, 4, dtype=F64)
    ours = rnnext.convert(lstm)
    assert type(ours) is rnnext.LSTM and ours.weight_ih_l0 is lstm.weight_ih_l0
    back = rnnext.to_torch(ours)
    assert type(back) is nn.LSTM and back.weight_ih_l0 is lstm.weight_ih_l0
    x, _ = make_inputs(lstm)
    torch.testing.assert_close(ours(x)[0], lstm(x)[0], rtol=0, atol=1e-12)


def test_subclasses_and_other_modules_are_left_alone():
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(2 * x, hx)

    model = nn.Sequential(MyLSTM(3, 4), nn.Linear(4, 4))
    rnnext.convert(model)
    assert type(model[0]) is MyLSTM and type(model[1]) is nn.Linear


@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_from_torch_keeps_each_requires_grad(kind):
    layer = getattr(nn, kind)(3, 4)
    layer.weight_ih_l0.requires_grad_(False) if kind == "LSTM" else layer.bias_hh.requires_grad_(False)
    ours = rnnext.from_torch(layer)
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == flags
    assert not all(flags.values())
    assert all(p is not q for p, q in zip(ours.parameters(), layer.parameters())), "from_torch copies"


def test_is_recurrent():
    assert rnnext.is_recurrent(rnnext.LSTM(2, 3), nn.LSTM)
    assert rnnext.is_recurrent(nn.LSTM(2, 3), nn.LSTM)
    assert not rnnext.is_recurrent(rnnext.LSTM(2, 3), nn.GRU)
    assert rnnext.is_recurrent(rnnext.GRU(2, 3), nn.RNNBase)
    assert rnnext.is_recurrent(rnnext.GRU(2, 3), (nn.LSTM, nn.GRU))
    assert rnnext.is_recurrent(rnnext.LSTMCell(2, 3), nn.RNNCellBase)
    assert not rnnext.is_recurrent(rnnext.LSTMCell(2, 3), nn.RNNBase)
    assert all(rnnext.is_recurrent(m) for m in (rnnext.RNN(2, 3), rnnext.GRUCell(2, 3), nn.RNNCell(2, 3)))
    assert not rnnext.is_recurrent(nn.Linear(2, 3))
    with pytest.raises(TypeError, match="kind"):
        rnnext.is_recurrent(rnnext.LSTM(2, 3), nn.Linear)


def test_state_dict_hooks_follow_the_new_layer():
    """A load_state_dict pre-hook registered with_module gets the layer that replaced the old
    one, and load_state_dict works after the old layer is gone."""
    import gc

    model = nn.Sequential(nn.GRU(3, 4, dtype=F64))
    seen = []
    model[0]._register_load_state_dict_pre_hook(lambda module, *args: seen.append(type(module)), with_module=True)
    state = copy.deepcopy(model.state_dict())
    rnnext.convert(model)
    gc.collect()  # the torch.nn GRU is unreferenced now
    model.load_state_dict(state)
    assert seen == [rnnext.GRU]


def test_weight_norm_layers_are_refused_parametrized_ones_left_alone():
    model = nn.Sequential(nn.utils.weight_norm(nn.LSTM(3, 4), name="weight_hh_l0"))
    with pytest.raises(ValueError, match="weight_hh_l0 is not a plain Parameter"):
        rnnext.convert(model)
    assert type(model[0]) is nn.LSTM
    layer = nn.GRU(3, 4)
    nn.utils.parametrize.register_parametrization(layer, "weight_hh_l0", nn.Identity())
    model = nn.Sequential(layer)
    rnnext.convert(model)
    assert model[0] is layer


def test_dropout_notice_is_given_once_at_the_callers_line():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = nn.Sequential(rnnext.LSTM(3, 4, dropout=0.5))
        rnnext.to_torch(layer)
    assert len(caught) == 1 and "dropout" in str(caught[0].message)
    assert caught[0].filename == __file__


def test_modules_pickled_before_param_shapes_load():
    """A module pickled by an rnnext that computed its parameter shapes lazily (no
    _param_shapes attribute) still runs after loading."""
    import pickle

    ours = rnnext.LSTM(3, 4, num_layers=2)
    del ours.__dict__["_param_shapes"]
    loaded = pickle.loads(pickle.dumps(ours))
    x = torch.randn(5, 2, 3)
    fresh = rnnext.LSTM(3, 4, num_layers=2)
    fresh.load_state_dict(ours.state_dict())
    torch.testing.assert_close(loaded(x)[0], fresh(x)[0], rtol=0, atol=0)
    assert loaded._param_shapes == fresh._param_shapes

"""Moving weights between torch.nn recurrent modules and rnnext's."""
from __future__ import annotations

import torch
from torch import nn

_LAYER_CONFIG = ("input_size", "hidden_size", "num_layers", "bias", "bidirectional", "proj_size")
_CELL_CONFIG = ("input_size", "hidden_size", "bias")
_CELL_CLASSES = {"RNNCell": None, "LSTMCell": "LSTM", "GRUCell": "GRU"}


def _kind(module: nn.Module):
    """(mode, is_cell) of a torch.nn or rnnext recurrent module; mode as torch.nn's RNNBase.mode."""
    from . import modules

    if isinstance(module, (nn.RNNBase, modules.RNNBase)):
        return module.mode, False
    if isinstance(module, (nn.RNNCellBase, modules.RNNCellBase)):
        name = "RNNCell" if isinstance(module, (nn.RNNCell, modules.RNNCell)) else \
            "LSTMCell" if isinstance(module, (nn.LSTMCell, modules.LSTMCell)) else "GRUCell"
        mode = _CELL_CLASSES[name] or ("RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU")
        return mode, True
    raise TypeError("expected a torch.nn or rnnext RNN, LSTM, GRU or *Cell module, got "
                    f"{type(module).__name__}")


def _param_names(module: nn.Module, is_cell: bool):
    if is_cell:
        return [n for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if getattr(module, n) is not None]
    return list(module._flat_weights_names)


def copy_parameters(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copies every parameter of ``src`` into ``dst``: torch.nn -> rnnext, rnnext -> torch.nn,
    or between two of either; layers or cells. Both must have the same cell type and sizes;
    dst keeps its own device and dtype. Returns dst."""
    (src_mode, src_cell), (dst_mode, dst_cell) = _kind(src), _kind(dst)
    if src_mode != dst_mode or src_cell != dst_cell:
        raise ValueError(f"cannot copy parameters of a {type(src).__name__} ({src_mode}) into a "
                         f"{type(dst).__name__} ({dst_mode})")
    for key in _CELL_CONFIG if src_cell else _LAYER_CONFIG:
        if getattr(src, key) != getattr(dst, key):
            raise ValueError(f"cannot copy parameters: {key} is {getattr(src, key)} in the source "
                             f"and {getattr(dst, key)} in the destination")
    with torch.no_grad():
        for name in _param_names(src, src_cell):
            getattr(dst, name).copy_(getattr(src, name))
    return dst


def from_torch(module: nn.Module) -> nn.Module:
    """A new rnnext module with the configuration, device, dtype, training mode and weights of
    a torch.nn RNN, LSTM, GRU, RNNCell, LSTMCell or GRUCell."""
    from . import modules

    mode, is_cell = _kind(module)
    weight = module.weight_ih if is_cell else module.weight_ih_l0
    factory = dict(device=weight.device, dtype=weight.dtype)
    nonlinearity = "relu" if mode == "RNN_RELU" else "tanh"
    if is_cell:
        if mode == "LSTM":
            ours = modules.LSTMCell(module.input_size, module.hidden_size, module.bias, **factory)
        elif mode == "GRU":
            ours = modules.GRUCell(module.input_size, module.hidden_size, module.bias, **factory)
        else:
            ours = modules.RNNCell(module.input_size, module.hidden_size, module.bias, nonlinearity, **factory)
    else:
        kwargs = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                      dropout=module.dropout, bidirectional=module.bidirectional, **factory)
        if mode == "LSTM":
            ours = modules.LSTM(module.input_size, module.hidden_size, proj_size=module.proj_size, **kwargs)
        elif mode == "GRU":
            ours = modules.GRU(module.input_size, module.hidden_size, **kwargs)
        else:
            ours = modules.RNN(module.input_size, module.hidden_size, nonlinearity=nonlinearity, **kwargs)
    copy_parameters(module, ours)
    ours.train(module.training)
    return ours

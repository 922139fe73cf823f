"""Moving weights between torch.nn recurrent modules and rnnext's."""
from __future__ import annotations

import torch
from torch import nn

_CONFIG = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional", "proj_size")


def _mode(module: nn.Module) -> str:
    mode = getattr(module, "mode", None)
    if mode not in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        raise TypeError(f"expected a torch.nn or rnnext RNN, LSTM or GRU module, got {type(module).__name__}")
    return mode


def copy_parameters(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copies every parameter of ``src`` into ``dst`` (torch.nn -> rnnext or rnnext -> torch.nn,
    or between two of either). The two must have the same cell type and sizes; dst keeps its
    own device and dtype. Returns dst."""
    if _mode(src) != _mode(dst):
        raise ValueError(f"cannot copy parameters of a {src.mode} module into a {dst.mode} module")
    for key in _CONFIG:
        if key in ("batch_first",):
            continue  # does not change the parameters
        if getattr(src, key, 0) != getattr(dst, key, 0):
            raise ValueError(f"cannot copy parameters: {key} is {getattr(src, key, 0)} in the source "
                             f"and {getattr(dst, key, 0)} in the destination")
    if list(src._flat_weights_names) != list(dst._flat_weights_names):
        raise ValueError("cannot copy parameters: the parameter names differ "
                         f"({src._flat_weights_names} vs {dst._flat_weights_names})")
    with torch.no_grad():
        for name in src._flat_weights_names:
            getattr(dst, name).copy_(getattr(src, name))
    return dst


def from_torch(module: nn.Module) -> nn.Module:
    """A new rnnext module with the configuration, device, dtype and weights of a torch.nn
    RNN, LSTM or GRU (dropout and training mode included)."""
    from .modules import GRU, LSTM, RNN

    mode = _mode(module)
    weight = module.weight_ih_l0
    kwargs = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                  dropout=module.dropout, bidirectional=module.bidirectional,
                  device=weight.device, dtype=weight.dtype)
    if mode == "LSTM":
        ours = LSTM(module.input_size, module.hidden_size, proj_size=module.proj_size, **kwargs)
    elif mode == "GRU":
        ours = GRU(module.input_size, module.hidden_size, **kwargs)
    else:
        ours = RNN(module.input_size, module.hidden_size,
                   nonlinearity="tanh" if mode == "RNN_TANH" else "relu", **kwargs)
    copy_parameters(module, ours)
    ours.train(module.training)
    return ours

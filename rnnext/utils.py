"""Moving weights between torch.nn recurrent modules and rnnext's."""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.module import _WrappedHook

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


def _config(module: nn.Module, mode: str, is_cell: bool):
    """(constructor kwargs, factory kwargs) that rebuild `module` (torch.nn or rnnext)."""
    weight = module.weight_ih if is_cell else module.weight_ih_l0
    factory = dict(device=weight.device, dtype=weight.dtype)
    if is_cell:
        kwargs = dict(input_size=module.input_size, hidden_size=module.hidden_size, bias=module.bias)
        if mode.startswith("RNN_"):
            kwargs["nonlinearity"] = module.nonlinearity
        return kwargs, factory
    kwargs = dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                  bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                  bidirectional=module.bidirectional)
    if mode == "LSTM":
        kwargs["proj_size"] = module.proj_size
    elif mode.startswith("RNN_"):
        kwargs["nonlinearity"] = module.nonlinearity
    return kwargs, factory


def _class_name(mode: str, is_cell: bool) -> str:
    base = "RNN" if mode.startswith("RNN_") else mode
    return base + "Cell" if is_cell else base


def _twin(module: nn.Module, namespace, share: bool) -> nn.Module:
    """The module's counterpart built from `namespace` (rnnext.modules or torch.nn) with its
    configuration, training mode and parameters: the same Parameter objects (share=True; so
    device, dtype, requires_grad, gradients and optimizer state carry over) or copies that
    keep each parameter's requires_grad."""
    mode, is_cell = _kind(module)
    kwargs, factory = _config(module, mode, is_cell)
    cls = getattr(namespace, _class_name(mode, is_cell))
    if share:
        factory = dict(device="meta", dtype=factory["dtype"])  # no storage: replaced just below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the module being replaced gave its notices already
        twin = cls(**kwargs, **factory)
    if share:
        for name in _param_names(module, is_cell):
            # setattr: torch.nn's layers keep their _flat_weights list in step with it
            setattr(twin, name, getattr(module, name))
    else:
        copy_parameters(module, twin)
        for name in _param_names(module, is_cell):
            getattr(twin, name).requires_grad_(getattr(module, name).requires_grad)
    twin.train(module.training)
    return twin


def from_torch(module: nn.Module) -> nn.Module:
    """A new rnnext module with the configuration, device, dtype, training mode and weights
    (copied, each keeping its requires_grad) of a torch.nn RNN, LSTM, GRU, RNNCell, LSTMCell or
    GRUCell."""
    from . import modules

    _kind(module)  # TypeError for anything else
    return _twin(module, modules, share=False)


# A module's hooks, moved by convert/to_torch with the module they belong to: its hook
# dictionaries themselves (so the handles returned at registration still remove them), and
# the flag of full backward hooks.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _rebind_hooks(hooks, module: nn.Module) -> None:
    """State-dict hooks registered to receive their module hold a weak reference to it: point
    them at the module that replaces it (in the shared dictionary, so handles still work)."""
    if not isinstance(hooks, dict):
        return
    for key, hook in list(hooks.items()):
        if isinstance(hook, _WrappedHook) and getattr(hook, "with_module", False):
            hooks[key] = _WrappedHook(hook.hook, module)


def _check_plain_parameters(module: nn.Module) -> None:
    """convert/to_torch share Parameters: a layer whose weights are computed by hooks (the
    hook-based torch.nn.utils.weight_norm / spectral_norm) has none to share."""
    mode, is_cell = _kind(module)
    for name in _param_names(module, is_cell):
        if not isinstance(module._parameters.get(name), nn.Parameter):
            raise ValueError(f"cannot convert {type(module).__name__}: {name} is not a plain Parameter "
                             "(weight_norm or spectral_norm?); remove those first, or use "
                             "torch.nn.utils.parametrize-based ones, whose layers convert leaves alone")


def _replace_tree(model: nn.Module, classes, namespace) -> nn.Module:
    memo = {}  # a module held twice in the tree is replaced by one module

    def replace(module):
        if id(module) in memo:
            return memo[id(module)]
        if type(module) in classes:  # exactly: a subclass may have its own forward
            _check_plain_parameters(module)
            new = _twin(module, namespace, share=True)
            for name in _HOOK_DICTS:
                if name in module.__dict__:
                    new.__dict__[name] = module.__dict__[name]
                    _rebind_hooks(new.__dict__[name], new)
            if namespace is nn and not _kind(module)[1]:
                new.flatten_parameters()  # cuDNN's single weight buffer (nothing on the CPU)
        else:
            new = module
            for name, child in list(module._modules.items()):
                if child is not None:
                    replaced = replace(child)
                    if replaced is not child:
                        module._modules[name] = replaced
        memo[id(module)] = new
        return new

    return replace(model)


def convert(model: nn.Module) -> nn.Module:
    """Replaces every torch.nn RNN, LSTM, GRU, RNNCell, LSTMCell and GRUCell inside `model` with
    its rnnext counterpart, in place, and returns the model (or, when `model` is itself such a
    layer, the new layer: use the return value).

    The new modules hold the very same Parameter objects, so device, dtype, requires_grad,
    gradients and an optimizer built before the conversion carry over, and a state_dict saved
    before loads after. Training mode and the module hooks registered on the old layers move
    too. Subclasses of the torch.nn layers are left alone (their forward may differ), and so
    are layers under torch.nn.utils.parametrize (their class is a subclass); a layer with
    hook-based weight_norm / spectral_norm is a ValueError."""
    from . import modules

    classes = {getattr(nn, name) for name in ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")}
    return _replace_tree(model, classes, modules)


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of convert: every rnnext layer and cell inside `model` replaced with its
    torch.nn counterpart, in place, sharing the Parameter objects; returns the model (or the
    new layer). For code that must run without rnnext: TorchScript, torch.ao quantization,
    a saved module loaded where rnnext is not installed."""
    from . import modules

    classes = {getattr(modules, name) for name in ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")}
    return _replace_tree(model, classes, nn)


def is_recurrent(module: nn.Module, kind=None) -> bool:
    """isinstance for torch.nn's recurrent classes that also accepts rnnext's counterparts,
    which do not subclass torch.nn's: is_recurrent(m, nn.LSTM) is True for an nn.LSTM and an
    rnnext.LSTM. kind: a torch.nn class (RNN, LSTM, GRU, RNNBase, RNNCell, LSTMCell, GRUCell,
    RNNCellBase) or a tuple of them; None means any recurrent layer or cell."""
    from . import modules

    twins = {nn.RNN: modules.RNN, nn.LSTM: modules.LSTM, nn.GRU: modules.GRU, nn.RNNBase: modules.RNNBase,
             nn.RNNCell: modules.RNNCell, nn.LSTMCell: modules.LSTMCell, nn.GRUCell: modules.GRUCell,
             nn.RNNCellBase: modules.RNNCellBase}
    kinds = (nn.RNNBase, nn.RNNCellBase) if kind is None else kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k not in twins:
            raise TypeError(f"is_recurrent: kind must be one of torch.nn's recurrent classes, got {k!r}")
    return isinstance(module, kinds + tuple(twins[k] for k in kinds))

"""Parity of rnnext against torch.nn with the same weights: the measurement behind
``python -m rnnext check``.

For one configuration, both modules run the same input (and initial state); the report is
the largest absolute difference, relative to the size of torch.nn's values, in the output,
the final states, and the gradients of the input, the initial states and every parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

# Largest allowed scaled difference |ours - torch| / max(1, |torch|max) per dtype. float64
# agrees to ~1e-15 in practice; float32 to ~1e-6 (different summation orders in the GEMMs).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 5e-6}


@dataclass
class Config:
    mode: str  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    num_layers: int = 1
    bidirectional: bool = False
    bias: bool = True
    batch_first: bool = False
    proj_size: int = 0
    with_hx: bool = False
    unbatched: bool = False
    packed: bool = False  # variable lengths, unsorted (enforce_sorted=False)
    dtype: torch.dtype = torch.float64
    seq_len: int = 12
    batch: int = 4
    input_size: int = 8
    hidden_size: int = 16

    def describe(self) -> str:
        parts = [f"layers={self.num_layers}"]
        for flag in ("bidirectional", "batch_first", "with_hx", "unbatched", "packed"):
            if getattr(self, flag):
                parts.append(flag)
        if not self.bias:
            parts.append("no-bias")
        if self.proj_size:
            parts.append(f"proj={self.proj_size}")
        return " ".join(parts)


@dataclass
class Result:
    config: Config
    errors: Dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.errors.values())

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.config.dtype]

    @property
    def passed(self) -> bool:
        return self.worst <= self.tolerance


def make_pair(cfg: Config):
    """A torch.nn module and the rnnext module with the same weights."""
    from . import modules

    kwargs = dict(num_layers=cfg.num_layers, bias=cfg.bias, batch_first=cfg.batch_first,
                  bidirectional=cfg.bidirectional, dtype=cfg.dtype)
    if cfg.mode == "LSTM":
        ref = nn.LSTM(cfg.input_size, cfg.hidden_size, proj_size=cfg.proj_size, **kwargs)
        ours = modules.LSTM(cfg.input_size, cfg.hidden_size, proj_size=cfg.proj_size, **kwargs)
    elif cfg.mode == "GRU":
        ref = nn.GRU(cfg.input_size, cfg.hidden_size, **kwargs)
        ours = modules.GRU(cfg.input_size, cfg.hidden_size, **kwargs)
    else:
        nl = "tanh" if cfg.mode == "RNN_TANH" else "relu"
        ref = nn.RNN(cfg.input_size, cfg.hidden_size, nonlinearity=nl, **kwargs)
        ours = modules.RNN(cfg.input_size, cfg.hidden_size, nonlinearity=nl, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _scaled_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    scale = max(1.0, ref.abs().max().item())
    return (ours - ref).abs().max().item() / scale


def compare(cfg: Config, generator: Optional[torch.Generator] = None) -> Result:
    g = generator or torch.Generator().manual_seed(0)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    ref, ours = make_pair(cfg)
    num_dirs = 2 if cfg.bidirectional else 1
    out_size = cfg.proj_size or cfg.hidden_size

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=cfg.dtype)

    if cfg.unbatched:
        x = rand(cfg.seq_len, cfg.input_size)
        state_batch = ()
    else:
        x = rand(cfg.batch, cfg.seq_len, cfg.input_size) if cfg.batch_first else \
            rand(cfg.seq_len, cfg.batch, cfg.input_size)
        state_batch = (cfg.batch,)
    h0 = rand(cfg.num_layers * num_dirs, *state_batch, out_size)
    c0 = rand(cfg.num_layers * num_dirs, *state_batch, cfg.hidden_size)
    lengths = None
    if cfg.packed:
        lengths = torch.randint(1, cfg.seq_len + 1, (cfg.batch,), generator=g)
        lengths[int(torch.randint(0, cfg.batch, (1,), generator=g))] = cfg.seq_len

    def run(module):
        xi = x.clone().requires_grad_()
        leaves = [xi]
        hx = None
        if cfg.with_hx:
            hi, ci = h0.clone().requires_grad_(), c0.clone().requires_grad_()
            hx = (hi, ci) if cfg.mode == "LSTM" else hi
            leaves += [hi, ci] if cfg.mode == "LSTM" else [hi]
        inp = xi
        if cfg.packed:
            inp = pack_padded_sequence(xi, lengths, batch_first=cfg.batch_first, enforce_sorted=False)
        out, state = module(inp, hx)
        if isinstance(out, PackedSequence):
            out = out.data
        states = list(state) if isinstance(state, tuple) else [state]
        # Every element weighted differently, so gradient errors cannot cancel.
        gen = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in [out] + states)
        params = [p for _, p in module.named_parameters()]
        grads = torch.autograd.grad(loss, leaves + params)
        names = ["grad input"] + (["grad h0", "grad c0"][:len(leaves) - 1]) + \
                [f"grad {n}" for n, _ in module.named_parameters()]
        values = {"output": out.detach(), "h_n": states[0].detach()}
        if len(states) > 1:
            values["c_n"] = states[1].detach()
        values.update(zip(names, grads))
        return values

    ref_values, our_values = run(ref), run(ours)
    result = Result(cfg)
    for key, ref_value in ref_values.items():
        result.errors[key] = _scaled_diff(our_values[key], ref_value)
    return result


def default_configs():
    """The configurations of the check report: every cell type and feature, both dtypes."""
    configs = []
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        variants = [
            dict(),
            dict(num_layers=2, bidirectional=True, with_hx=True),
            dict(num_layers=3, batch_first=True, bias=False),
            dict(unbatched=True, with_hx=True),
            dict(packed=True, num_layers=2, bidirectional=True, with_hx=True),
        ]
        if mode == "LSTM":
            variants.append(dict(proj_size=5, num_layers=2, bidirectional=True, with_hx=True))
        for dtype in (torch.float32, torch.float64):
            for v in variants:
                configs.append(Config(mode=mode, dtype=dtype, **v))
    return configs

"""Parity of rnnext against torch.nn with the same weights: the measurement behind
``python -m rnnext check``.

For one configuration, both modules run the same input (and initial state); the report is
the largest absolute difference, relative to the size of torch.nn's values, in the output,
the final states, and the gradients of the input, the initial states and every parameter.

On a CUDA device both modules are moved there (the weights and inputs are drawn on the CPU,
so the values are the same on every device); torch.nn runs with TF32 off. float16 and
bfloat16 are compared with a float64 oracle instead: torch.nn in float64 on the CPU with the
same weights and inputs. rnnext's half result and torch.nn's half result are both measured
against it, and rnnext passes when its error is at most half_allowance(device, dtype,
torch.nn's error).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

# Largest allowed scaled difference |ours - torch| / max(1, |torch|max), keyed by
# (device type, dtype). float64 agrees to ~1e-15 in practice; float32 on the CPU to ~1e-6
# (different summation orders in the GEMMs), on CUDA looser because cuDNN and cuBLAS sum in
# other orders again.
TOLERANCE = {
    ("cpu", torch.float64): 1e-12,
    ("cpu", torch.float32): 5e-6,
    ("cuda", torch.float64): 1e-12,
    ("cuda", torch.float32): 2e-5,
}
# float16 and bfloat16 are measured against a float64 oracle: rnnext's scaled error may be up
# to max(factor x torch.nn's, floor), per (device type, dtype). On the CPU rnnext computes in
# float32 and rounds only what it stores, so it is held to torch.nn's own error (x1.25 for
# the luck of roundings) or two units of roundoff (2^-10, 2^-7). The CUDA floors are ~20 and
# ~12 units (2^-11, 2^-8): room for a different but sound order of half roundings there.
HALF_DTYPES = (torch.float16, torch.bfloat16)
HALF_ALLOWANCE = {
    ("cpu", torch.float16): (1.25, 1e-3),
    ("cpu", torch.bfloat16): (1.25, 8e-3),
    ("cuda", torch.float16): (2.0, 1e-2),
    ("cuda", torch.bfloat16): (2.0, 5e-2),
}


def half_allowance(device, dtype: torch.dtype, torch_error: float) -> float:
    """The largest scaled error rnnext may have against the float64 oracle in a half dtype,
    where torch.nn's is torch_error: max(factor x torch_error, floor) of HALF_ALLOWANCE."""
    factor, floor = HALF_ALLOWANCE[(torch.device(device).type, dtype)]
    return max(factor * torch_error, floor)


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
    device: str = "cpu"  # device type the modules ran on
    # float16/bfloat16: torch.nn's own errors against the float64 oracle (errors are rnnext's).
    ref_errors: Optional[Dict[str, float]] = None

    @property
    def worst(self) -> float:
        return max(self.errors.values())

    @property
    def ref_worst(self) -> Optional[float]:
        return max(self.ref_errors.values()) if self.ref_errors else None

    @property
    def tolerance(self) -> float:
        """The allowance: TOLERANCE's value or, against the float64 oracle, half_allowance."""
        if self.ref_errors is not None:
            return half_allowance(self.device, self.config.dtype, self.ref_worst)
        return tolerance(self.device, self.config.dtype)

    @property
    def passed(self) -> bool:
        return self.worst <= self.tolerance


def tolerance(device, dtype: torch.dtype) -> float:
    """TOLERANCE for a device (torch.device or string such as "cuda:0") and dtype."""
    key = (torch.device(device).type, dtype)
    if key not in TOLERANCE:
        raise ValueError(f"no parity tolerance for {dtype} on {key[0]}")
    return TOLERANCE[key]


@contextlib.contextmanager
def strict_fp32(device):
    """On CUDA: TF32 off in cuDNN and cuBLAS for the duration (restored afterwards), so that
    torch.nn's float32 results are full float32. Nothing on the CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_pair(cfg: Config):
    """A torch.nn module and the rnnext module with the same weights (on the CPU)."""
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
    ours = ours.to(device=ref.device, dtype=ref.dtype)  # a half result against the float64 oracle
    scale = max(1.0, ref.abs().max().item())
    return (ours - ref).abs().max().item() / scale


def scaled_errors(values: Dict[str, torch.Tensor], ref_values: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """{name: scaled difference} of the values of one run against those of a reference run
    (each compared on the reference's device and in its dtype)."""
    return {key: _scaled_diff(values[key], ref_value) for key, ref_value in ref_values.items()}


class Inputs(NamedTuple):
    """The data of one configuration, on the CPU in the configuration's dtype."""

    x: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    lengths: Optional[torch.Tensor]  # packed only; int64 on the CPU


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 values are drawn in float32 and rounded, so the float64 oracle sees
    # exactly the values the half runs see.
    return torch.float32 if dtype in HALF_DTYPES else dtype


def draw_inputs(cfg: Config, g: torch.Generator) -> Inputs:
    num_dirs = 2 if cfg.bidirectional else 1
    out_size = cfg.proj_size or cfg.hidden_size

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=_draw_dtype(cfg.dtype)).to(cfg.dtype)

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
    return Inputs(x, h0, c0, lengths)


def evaluate(module: nn.Module, cfg: Config, inputs: Inputs) -> Dict[str, torch.Tensor]:
    """Runs `module` forward and backward on `inputs` moved to the module's device and dtype;
    returns {name: tensor} of the output, final states and every gradient."""
    weight = next(module.parameters())
    device, dtype = weight.device, weight.dtype

    def leaf(t):
        return t.to(device=device, dtype=dtype, copy=True).requires_grad_()

    xi = leaf(inputs.x)
    leaves = [xi]
    hx = None
    if cfg.with_hx:
        hi, ci = leaf(inputs.h0), leaf(inputs.c0)
        hx = (hi, ci) if cfg.mode == "LSTM" else hi
        leaves += [hi, ci] if cfg.mode == "LSTM" else [hi]
    inp = xi
    if cfg.packed:
        inp = pack_padded_sequence(xi, inputs.lengths, batch_first=cfg.batch_first, enforce_sorted=False)
    out, state = module(inp, hx)
    if isinstance(out, PackedSequence):
        out = out.data
    states = list(state) if isinstance(state, tuple) else [state]
    # Every element weighted differently, so gradient errors cannot cancel. The weights are
    # drawn on the CPU in the configuration's dtype (the same values on every device, and for
    # the float64 oracle the half values exactly).
    gen = torch.Generator().manual_seed(1)

    def weights(t):
        w = torch.randn(t.shape, generator=gen, dtype=_draw_dtype(cfg.dtype)).to(cfg.dtype)
        return w.to(device=t.device, dtype=t.dtype)

    loss = sum((t * weights(t)).sum() for t in [out] + states)
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, leaves + params)
    names = ["grad input"] + (["grad h0", "grad c0"][:len(leaves) - 1]) + \
            [f"grad {n}" for n, _ in module.named_parameters()]
    values = {"output": out.detach(), "h_n": states[0].detach()}
    if len(states) > 1:
        values["c_n"] = states[1].detach()
    values.update(zip(names, grads))
    return values


def compare_with_oracle(cfg: Config, ref: nn.Module, ours: nn.Module, inputs: Inputs,
                        device="cpu") -> Result:
    """A half-precision comparison: `ref` (torch.nn) and `ours` (any module with the same
    parameter names, e.g. rnnext's) both move to `device` and are measured against a float64
    oracle, torch.nn on the CPU with ref's weights cast to float64 and the same inputs.
    Result.errors are ours', Result.ref_errors ref's."""
    oracle = copy.deepcopy(ref).to(device="cpu", dtype=torch.float64)
    oracle_values = evaluate(oracle, cfg, inputs)
    ref_values = evaluate(ref.to(device), cfg, inputs)
    our_values = evaluate(ours.to(device), cfg, inputs)
    return Result(cfg, scaled_errors(our_values, oracle_values), torch.device(device).type,
                  scaled_errors(ref_values, oracle_values))


def compare(cfg: Config, generator: Optional[torch.Generator] = None, device="cpu") -> Result:
    """rnnext against torch.nn for one configuration, both on `device` ("cpu", "cuda", ...)."""
    g = generator or torch.Generator().manual_seed(0)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    ref, ours = make_pair(cfg)
    inputs = draw_inputs(cfg, g)
    with strict_fp32(device):
        if cfg.dtype in HALF_DTYPES:
            return compare_with_oracle(cfg, ref, ours, inputs, device)
        ref_values = evaluate(ref.to(device), cfg, inputs)
        our_values = evaluate(ours.to(device), cfg, inputs)
    return Result(cfg, scaled_errors(our_values, ref_values), torch.device(device).type)


def default_configs(device="cpu") -> List[Config]:
    """The configurations of the check report: every cell type and feature, in float32,
    float64, float16 and bfloat16 (the same on every device)."""
    dtypes = (torch.float32, torch.float64, *HALF_DTYPES)
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
        for dtype in dtypes:
            for v in variants:
                configs.append(Config(mode=mode, dtype=dtype, **v))
    return configs

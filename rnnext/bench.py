"""Speed of rnnext against torch.nn on this machine (CPU or a CUDA device): the measurement
behind ``python -m rnnext bench`` and benchmarks/run.py.

Each row times the same model (same weights, same input) in rnnext and in torch.nn, in the
same process, interleaved (ours, torch, floor, ours, torch, floor, ...), and reports medians.
"fwd" is inference (eval mode, no grad); "train" is forward + backward of a loss over the
output and the final states. The floor is the time of the row's GEMMs alone (same shapes and
counts), each on the fastest GEMM found here (torch.mm, i.e. MKL/OpenBLAS, or oneDNN with
its weight reordered once per call), timed in the same rounds as the pair; "of floor" is
floor / rnnext time.
"saved MiB" is what autograd keeps between forward and backward (unique storages packed by
saved-tensor hooks), torch.nn vs rnnext.

On a CUDA device the same code runs with the models and inputs moved there (weights and inputs
drawn on the CPU, as there), timed with CUDA events after warm-up calls and a synchronize;
torch.nn keeps cuDNN's defaults, and the floor is the fastest of a torch.mm loop and one
torch.bmm on the device, in the row's dtype.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@dataclass
class Row:
    cell: str  # "LSTM", "GRU", "RNN" (tanh)
    T: int
    B: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    proj: int = 0
    packed: bool = False  # lengths spread over [T/10, T], unsorted
    dtype: torch.dtype = torch.float32

    @property
    def I(self) -> int:  # noqa: E743 - the usual name
        return self.H

    def name(self) -> str:
        s = f"{self.cell} T={self.T} B={self.B} H={self.H}"
        if self.layers > 1:
            s += f" L={self.layers}"
        if self.bidirectional:
            s += " bidir"
        if self.proj:
            s += f" proj={self.proj}"
        if self.packed:
            s += " packed"
        if self.dtype != torch.float32:
            s += " " + str(self.dtype).replace("torch.", "")
        return s


def default_rows(device="cpu") -> List[Row]:
    """The suite's rows; on CUDA two larger LSTM rows more, the second in bfloat16."""
    rows = []
    for cell in ("LSTM", "GRU", "RNN"):
        for T, B, H in ((100, 1, 64), (100, 32, 256), (50, 64, 1024)):
            rows.append(Row(cell, T, B, H))
    rows.append(Row("GRU", 50, 16, 128, layers=2, bidirectional=True))
    rows.append(Row("LSTM", 50, 16, 256, layers=2, proj=128))
    rows.append(Row("LSTM", 100, 32, 256, packed=True))
    if torch.device(device).type == "cuda":
        rows.append(Row("LSTM", 100, 64, 512))
        rows.append(Row("LSTM", 1024, 16, 768, dtype=torch.bfloat16))
    return rows


@dataclass
class Result:
    row: str
    mode: str
    torch_ms: float
    rnnext_ms: float
    floor_ms: float
    torch_saved_mib: Optional[float] = None
    rnnext_saved_mib: Optional[float] = None
    speedup: float = field(init=False)
    of_floor: float = field(init=False)

    def __post_init__(self):
        self.speedup = self.torch_ms / self.rnnext_ms
        self.of_floor = self.floor_ms / self.rnnext_ms


# ---------------------------------------------------------------- models and inputs
def _models(row: Row, device="cpu"):
    """torch.nn's model and rnnext's with the same weights (drawn on the CPU) on `device`."""
    from .utils import from_torch

    torch.manual_seed(0)
    kwargs = dict(num_layers=row.layers, bidirectional=row.bidirectional)
    if row.cell == "LSTM":
        ref = nn.LSTM(row.I, row.H, proj_size=row.proj, **kwargs)
    elif row.cell == "GRU":
        ref = nn.GRU(row.I, row.H, **kwargs)
    else:
        ref = nn.RNN(row.I, row.H, **kwargs)
    ref.to(device=device, dtype=row.dtype)
    return ref, from_torch(ref)


def _lengths(row: Row) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, row.T // 10), row.T + 1, (row.B,), generator=g)
    lengths[0] = row.T
    return lengths


def _input(row: Row, requires_grad: bool, device="cpu"):
    x = torch.randn(row.T, row.B, row.I, generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=row.dtype)
    x.requires_grad_(requires_grad)
    if row.packed:
        return x, pack_padded_sequence(x, _lengths(row), enforce_sorted=False)
    return x, x


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _step_fn(model: nn.Module, row: Row, mode: str) -> Callable[[], None]:
    """One inference or training step of `model` on the row's input, on the model's device."""
    device = _device_of(model)
    if mode == "fwd":
        model.eval()
        _, inp = _input(row, requires_grad=False, device=device)

        def run():
            with torch.no_grad():
                model(inp)
        return run

    model.train()
    x, _ = _input(row, requires_grad=True, device=device)
    lengths = _lengths(row) if row.packed else None

    def run():
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if row.packed else x
        out, state = model(inp)
        out = out.data if row.packed else out
        states = state if isinstance(state, tuple) else (state,)
        loss = out.sum() + sum(s.sum() for s in states)
        loss.backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    return run


def _saved_mib(model: nn.Module, row: Row) -> float:
    """MiB of unique storages autograd saves for backward in one training forward."""
    model.train()
    x, inp = _input(row, requires_grad=True, device=_device_of(model))
    storages: Dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = model(inp)
    del out
    return sum(storages.values()) / 2**20


# ---------------------------------------------------------------- timing
def _synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], None], number: int, device="cpu") -> float:
    """Seconds per call of `number` back-to-back calls: the wall clock on the CPU, CUDA events
    on the device's current stream on CUDA (the host's launch gaps included)."""
    device = torch.device(device)
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(number):
            fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def time_alternately(fns: List[Callable[[], None]], repeats: int, min_seconds: float = 0.05,
                     device="cpu") -> List[float]:
    """Median seconds per call of each of fns (all running on `device`), measured in turn
    (a, b, c, a, b, c, ...), so that a machine's drift over the run reaches all of them alike."""
    # Warm-up (allocator, caches, weight packing; on CUDA also cuDNN's plans and lazy module loads).
    for _ in range(1 if torch.device(device).type == "cpu" else 3):
        for fn in fns:
            fn()
    _synchronize(device)
    est = max(max(_time_once(fn, 1, device) for fn in fns), 1e-6)
    number = max(1, int(min_seconds / est))
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(_time_once(fn, number, device))
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------- GEMM floor
def _gemm_list(row: Row, mode: str) -> Dict[Tuple[int, int, int], int]:
    """{(m, n, k): count} of the GEMMs a layer stack must do: [m, k] x [k, n]."""
    G = GATES[row.cell]
    H, Hout = row.H, row.proj or row.H
    D = 2 if row.bidirectional else 1
    steps = [int((_lengths(row) > t).sum()) for t in range(row.T)] if row.packed else [row.B] * row.T
    N = sum(steps)
    gemms: Dict[Tuple[int, int, int], int] = {}

    def add(m, n, k, count=1):
        gemms[(m, n, k)] = gemms.get((m, n, k), 0) + count

    for layer in range(row.layers):
        I = row.I if layer == 0 else Hout * D
        for _ in range(D):
            add(N, G * H, I)  # input projection
            for b in steps:
                add(b, G * H, Hout)  # recurrent
                if row.proj:
                    add(b, Hout, H)  # projection
            if mode == "train":
                for b in steps:
                    add(b, Hout, G * H)  # dh_prev = d_gates @ W_hh
                    if row.proj:
                        add(b, H, Hout)  # dr = dh @ W_hr
                add(N, I, G * H)  # dx
                add(G * H, I, N)  # dW_ih
                add(G * H, Hout, N)  # dW_hh
                if row.proj:
                    add(Hout, H, N)  # dW_hr
    return gemms


_ROUTE_CACHE: Dict[tuple, str] = {}


def _gemm_routes(m: int, n: int, k: int, count: int, device: torch.device,
                 dtype: torch.dtype) -> Dict[str, Callable[[], Callable[[], None]]]:
    """{route: builder}: each builder makes its operands and returns a function doing `count`
    products [m, k] x [k, n] that way (so a route not chosen holds no memory)."""
    factory = dict(device=device, dtype=dtype)

    def mm_loop():
        a, w, out = torch.randn(m, k, **factory), torch.randn(n, k, **factory), torch.empty(m, n, **factory)
        return lambda: [torch.mm(a, w.t(), out=out) for _ in range(count)]

    def bmm():
        a_all, w = torch.randn(count, m, k, **factory), torch.randn(n, k, **factory)
        w_all, out_all = w.t().expand(count, k, n), torch.empty(count, m, n, **factory)
        return lambda: torch.bmm(a_all, w_all, out=out_all)

    def onednn_linear():
        # The weight's reorder into oneDNN's layout is timed once per call, as MKL's packing
        # is inside each torch.mm: a caller's operands (a weight gradient's, or weights an
        # optimizer step has changed) come in torch's layout, not prepacked.
        a, w = torch.randn(m, k, **factory), torch.randn(n, k, **factory)

        def run():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
            for _ in range(count):
                torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        run()
        return run

    routes = {"mm": mm_loop}
    if count > 1:
        routes["bmm"] = bmm
    if device.type == "cpu":
        routes["onednn"] = onednn_linear
    return routes


def _fastest_gemm(m: int, n: int, k: int, count: int, device="cpu",
                  dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """A function doing `count` products [m, k] x [k, n] on `device` in `dtype`, on the fastest
    route measured there (once per shape; _ROUTE_CACHE): a loop of torch.mm (MKL/OpenBLAS on
    the CPU, cuBLAS on CUDA), one batched torch.bmm over all `count` (which leaves out
    Python's per-call cost for small products), and on the CPU a loop of oneDNN linear on
    the weight reordered once per call."""
    device = torch.device(device)
    routes = _gemm_routes(m, n, k, count, device, dtype)
    key = (m, n, k, count, str(device), dtype)
    if key not in _ROUTE_CACHE:
        best = math.inf
        for name, build in routes.items():
            try:
                fn = build()
            except (RuntimeError, AttributeError):  # a torch without the mkldnn ops
                continue
            fn()
            _synchronize(device)
            est = max(_time_once(fn, 1, device), 1e-7)
            number = max(1, int(0.02 / est))
            seconds = statistics.median(_time_once(fn, number, device) for _ in range(5))
            if seconds < best:
                best, _ROUTE_CACHE[key] = seconds, name
            del fn
    return routes[_ROUTE_CACHE[key]]()


def floor_fn(gemms: Dict[Tuple[int, int, int], int], device="cpu",
             dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """A function running the GEMMs {(m, n, k): count} each on its fastest route (_fastest_gemm):
    timed with the pair it is the floor of."""
    fns = [_fastest_gemm(*shape, count, device, dtype) for shape, count in gemms.items()]

    def run():
        for fn in fns:
            fn()
    return run


# ---------------------------------------------------------------- step-at-a-time rows
@dataclass
class StepRow:
    """A call that runs one time step (or, with decode > 1, a loop of such calls feeding each
    output back as the next input, as a decoder does): a *Cell module, or an RNN/LSTM/GRU layer
    stack called on a one-step sequence with the carried state. input_size = hidden_size."""
    kind: str  # "LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU"
    B: int
    H: int
    layers: int = 1  # layer stacks only
    decode: int = 1  # calls per timed function
    dtype: torch.dtype = torch.float32

    @property
    def cell(self) -> str:
        return self.kind.replace("Cell", "")

    @property
    def is_cell(self) -> bool:
        return self.kind.endswith("Cell")

    def name(self) -> str:
        s = self.kind if self.is_cell else f"{self.kind} L={self.layers}"
        s += f" B={self.B} H={self.H}"
        if not self.is_cell:
            s += f" decode {self.decode}" if self.decode > 1 else " one step"
        if self.dtype != torch.float32:
            s += " " + str(self.dtype).replace("torch.", "")
        return s


def step_rows() -> List[StepRow]:
    """Each *Cell at B=1/H=64 and B=32/H=256 in float32 and float64; LSTM and GRU stacks of 1
    and 2 layers called one step at a time at B=1/H=256 and B=16/H=512; a 100-step decoding loop
    through a 2-layer LSTM and GRU."""
    rows = []
    for dtype in (torch.float32, torch.float64):
        for kind in ("LSTMCell", "GRUCell", "RNNCell"):
            for B, H in ((1, 64), (32, 256)):
                rows.append(StepRow(kind, B, H, dtype=dtype))
    for kind in ("LSTM", "GRU"):
        for layers in (1, 2):
            for B, H in ((1, 256), (16, 512)):
                rows.append(StepRow(kind, B, H, layers=layers))
    for kind in ("LSTM", "GRU"):
        rows.append(StepRow(kind, 1, 256, layers=2, decode=100))
    return rows


def _step_models(row: StepRow, device="cpu"):
    from .utils import from_torch

    torch.manual_seed(0)
    cls = getattr(nn, row.kind)
    ref = cls(row.H, row.H) if row.is_cell else cls(row.H, row.H, num_layers=row.layers)
    ref.to(device=device, dtype=row.dtype)
    return ref, from_torch(ref)


def _step_call_fn(model: nn.Module, row: StepRow, mode: str) -> Callable[[], None]:
    """fwd: the call(s) under no_grad; train: one call, then backward of the sum of its outputs
    (the input is data, the state carried in: gradients reach the parameters)."""
    device = _device_of(model)
    g = torch.Generator().manual_seed(1)
    factory = dict(device=device, dtype=row.dtype)
    lead = () if row.is_cell else (row.layers,)
    x = torch.randn(row.B, row.H, generator=g).to(**factory)
    if not row.is_cell:
        x = x.unsqueeze(0)  # [1, B, H]: one time step
    h = torch.randn(*lead, row.B, row.H, generator=g).to(**factory)
    state = (h, h.clone()) if row.cell == "LSTM" else h

    def call(inp, hx):
        out = model(inp, hx)
        if row.is_cell:  # h' or (h', c'); the next input is h'
            return (out[0] if isinstance(out, tuple) else out), out
        return out[0], out[1]

    if mode == "fwd":
        model.eval()

        def run():
            inp, hx = x, state
            with torch.no_grad():
                for _ in range(row.decode):
                    inp, hx = call(inp, hx)
        return run

    model.train()

    def run():
        out, hx = call(x, state)
        states = hx if isinstance(hx, tuple) else (hx,)
        loss = out.sum() + sum(s.sum() for s in states)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def _step_gemm_list(row: StepRow, mode: str) -> Dict[Tuple[int, int, int], int]:
    """{(m, n, k): count} of the GEMMs one timed function must do."""
    G, H, B = GATES[row.cell], row.H, row.B
    gemms: Dict[Tuple[int, int, int], int] = {}
    for shape in ((B, G * H, H), (B, G * H, H)):  # input and recurrent products
        gemms[shape] = gemms.get(shape, 0) + row.layers * row.decode
    if mode == "train":
        for shape in ((B, H, G * H), (B, H, G * H), (G * H, H, B), (G * H, H, B)):  # dx, dh, dW_ih, dW_hh
            gemms[shape] = gemms.get(shape, 0) + row.layers
    return gemms


def run_steps(rows: List[StepRow], modes=("fwd", "train"), repeats: int = 7,
              progress: Callable[[str], None] = print, device="cpu") -> List[Result]:
    """The step-at-a-time suite: as run(), times in milliseconds per timed function; decoding
    loops are inference only."""
    results = []
    jobs = [(row, mode) for row in rows for mode in modes if mode == "fwd" or row.decode == 1]
    for i, (row, mode) in enumerate(jobs):
        ref, ours = _step_models(row, device)
        floor = floor_fn(_step_gemm_list(row, mode), device, row.dtype)
        t_ours, t_torch, t_floor = time_alternately(
            [_step_call_fn(ours, row, mode), _step_call_fn(ref, row, mode), floor], repeats, device=device)
        res = Result(row.name(), mode, t_torch * 1e3, t_ours * 1e3, t_floor * 1e3)
        results.append(res)
        progress(f"[{i + 1}/{len(jobs)}] {res.row:<34} {mode:<5} torch {res.torch_ms * 1e3:9.1f} us"
                 f"  rnnext {res.rnnext_ms * 1e3:9.1f} us  x{res.speedup:5.2f}")
    return results


# ---------------------------------------------------------------- the suite
def run(rows: List[Row], modes=("fwd", "train"), repeats: int = 7,
        progress: Callable[[str], None] = print, device="cpu") -> List[Result]:
    results = []
    total = len(rows) * len(modes)
    for i, row in enumerate(rows):
        for j, mode in enumerate(modes):
            ref, ours = _models(row, device)
            floor = floor_fn(_gemm_list(row, mode), device, row.dtype)
            t_ours, t_torch, t_floor = time_alternately(
                [_step_fn(ours, row, mode), _step_fn(ref, row, mode), floor], repeats, device=device)
            del floor
            saved = (_saved_mib(ref, row), _saved_mib(ours, row)) if mode == "train" else (None, None)
            res = Result(row.name(), mode, t_torch * 1e3, t_ours * 1e3, t_floor * 1e3, saved[0], saved[1])
            results.append(res)
            progress(f"[{i * len(modes) + j + 1}/{total}] {res.row:<34} {mode:<5} torch {res.torch_ms:9.2f} ms"
                     f"  rnnext {res.rnnext_ms:9.2f} ms  x{res.speedup:5.2f}")
    return results


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def table(results: List[Result], unit: str = "ms") -> str:
    """A markdown table of results, times in ms (or "us" for the step-at-a-time suite)."""
    scale = 1e3 if unit == "us" else 1.0
    lines = [f"| shape | mode | torch.nn {unit} | rnnext {unit} | speedup | GEMM floor {unit} | of floor "
             "| saved MiB torch / rnnext |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        saved = f"{r.torch_saved_mib:.1f} / {r.rnnext_saved_mib:.1f}" if r.torch_saved_mib is not None else ""
        lines.append(f"| {r.row} | {r.mode} | {r.torch_ms * scale:.2f} | {r.rnnext_ms * scale:.2f} | "
                     f"{r.speedup:.2f}x | {r.floor_ms * scale:.2f} | {100 * r.of_floor:.0f}% | {saved} |")
    lines.append(f"\nGeometric-mean speedup over {len(results)} rows: {geomean(r.speedup for r in results):.2f}x; "
                 f"slowest row: {min(r.speedup for r in results):.2f}x")
    return "\n".join(lines)


def to_json(results: List[Result], machine: str, device_fields: Optional[dict] = None) -> dict:
    """The report as JSON; `device_fields` (on CUDA: device, GPU, CUDA and cuDNN versions) are
    merged in after the machine fields."""
    return {"machine": machine, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), **(device_fields or {}),
            "results": [asdict(r) for r in results],
            "geomean_speedup": geomean(r.speedup for r in results)}

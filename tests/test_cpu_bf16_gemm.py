"""The bfloat16 input projection on AVX512-BF16 dot products (csrc/cpu/packed_gemm_bf16.h).

* torch.ops.rnnext._step_gemm(..., "bf16", ...) runs the kernel alone (a and w bfloat16, c
  float32) at sizes that reach its remainder paths: row blocks of every height (even blocks
  of up to 9 rows, 4-strip groups below 4 rows), partial last strips, an odd k (its last
  value taken alone), strided rows of A and C, with and without a bias. The oracle is the
  product in float64 with the bound on float32 rounding of a k-term sum (the products of
  two bfloat16 are exact); nothing past the last column of C is written. The same bits run
  to run and with the strips split across 1 or 2 threads.
* bfloat16 layers, padded and packed, both directions, with the input projection fused into
  the step loop (B=32, two unit blocks) and per chunk (B=5): the route is taken (the profiler
  sees its weights packed; the float32 training workspace differs in its last bits from the
  float32 route's, rnnext._C.cpu_option "bf16_gemm" off) and the results are as close to
  the float64 oracle as test_half.py asks of every half-precision layer (within
  parity.half_allowance of torch.nn's error). One- and two-step calls keep the float32 route
  (same bits either way).

CPU only; skipped, with the reason, on CPUs without AVX512-BF16 (absent hardware).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers import (BF16, CELLS, F64, OP_CELLS, assert_half_within, cpu_option, forward_op, half_twins,
                     make_inputs, make_pair, op_args, rounded, run, run_packed, to_device)

ROWS = list(range(1, 21)) + [25, 35, 64]
COLS = (1, 15, 16, 17, 33, 47, 48, 49, 64, 100, 191)
DEPTHS = (0, 1, 2, 3, 40, 257, 600)


def require_bf16_gemm() -> None:
    try:
        torch.ops.rnnext._step_gemm(torch.ones(1, 1, dtype=BF16), torch.ones(1, 1, dtype=BF16), torch.zeros(1, 1),
                                    "bf16", False)
    except ValueError as e:  # the message says which: this CPU lacks it (absent hardware), or the build
        pytest.skip(str(e).splitlines()[0])


@pytest.fixture(autouse=True)
def two_threads_route_on():
    """Two threads (so B=32 splits into two unit blocks on any machine) and the route on
    whatever RNNEXT_BF16_GEMM the process was started with."""
    require_bf16_gemm()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with cpu_option("bf16_gemm", "1"), cpu_option("own_gemm", "auto"):
        yield
    torch.set_num_threads(before)


def operands(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k + 3, generator=g).to(BF16)[:, :k]  # rows k + 3 apart
    w = torch.randn(n, k, generator=g).to(BF16)
    bias = torch.randn(n, generator=g)
    return a, w, bias


def reference(a, w, bias):
    """The product in float64 and the bound on its float32 rounding (k exact products summed,
    plus the bias): (k + 2) * 2^-24 * (|a| @ |w|^T + |bias|)."""
    extra = bias.double() if bias is not None else 0
    exact = a.double() @ w.double().t() + extra
    scale = a.double().abs() @ w.double().abs().t() + (bias.double().abs() if bias is not None else 0)
    return exact, (a.shape[1] + 2) * 2.0 ** -24 * scale + 1e-30


def test_kernel_matches_float64():
    for m, n, k in itertools.product(ROWS, COLS, DEPTHS):
        a, w, bias = operands(m, n, k, seed=m * 1000 + n * 10 + k)
        c = torch.randn(m, n)  # not added: the route computes C afresh
        for b in (None, bias):
            got = torch.ops.rnnext._step_gemm(a, w, c, "bf16", False, b)
            assert got.dtype == torch.float32
            padding = torch.empty(0).set_(got.untyped_storage(), 0, (m, n + 5), (n + 5, 1))[:, n:]
            assert bool(padding.isnan().all()), f"m={m} n={n} k={k}: wrote past column n"
            exact, bound = reference(a, w, b)
            err = (got.double() - exact).abs()
            assert bool((err <= bound).all()), (
                f"m={m} n={n} k={k} bias={b is not None}: error {err.max().item():.3e} over the rounding bound "
                f"by a factor {(err / bound).max().item():.2f}")


def test_kernel_chunk_sized_products():
    """Products of a chunk of steps, split over strips across two threads."""
    for m, n, k in ((1000, 1024, 256), (513, 770, 129)):
        a, w, bias = operands(m, n, k, seed=m + n + k)
        got = torch.ops.rnnext._step_gemm(a, w, torch.zeros(m, n), "bf16", False, bias)
        exact, bound = reference(a, w, bias)
        assert bool(((got.double() - exact).abs() <= bound).all()), (m, n, k)


def test_kernel_same_bits_run_to_run_and_across_threads():
    for m, n, k in ((64, 1024, 256), (7, 191, 257), (300, 96, 41)):
        a, w, bias = operands(m, n, k, seed=k)
        first = torch.ops.rnnext._step_gemm(a, w, torch.zeros(m, n), "bf16", False, bias)
        assert torch.equal(first, torch.ops.rnnext._step_gemm(a, w, torch.zeros(m, n), "bf16", False, bias))
        torch.set_num_threads(1)
        assert torch.equal(first, torch.ops.rnnext._step_gemm(a, w, torch.zeros(m, n), "bf16", False, bias))


def test_kernel_checks_its_arguments():
    a, w = torch.ones(2, 3, dtype=BF16), torch.ones(4, 3, dtype=BF16)
    with pytest.raises(RuntimeError, match="bfloat16 a and w, and a float32 c"):
        torch.ops.rnnext._step_gemm(a.float(), w, torch.zeros(2, 4), "bf16", False)
    with pytest.raises(RuntimeError, match="bfloat16 a and w, and a float32 c"):
        torch.ops.rnnext._step_gemm(a, w, torch.zeros(2, 4, dtype=BF16), "bf16", False)
    with pytest.raises(RuntimeError, match="does not accumulate"):
        torch.ops.rnnext._step_gemm(a, w, torch.zeros(2, 4), "bf16", True)


# ============================================================================ layers
# (batch, hidden): B=32, H=128 splits every cell's step loop into two unit blocks with the
# input product fused into it (a bfloat16 W_ih packed per block); B=5 projects per chunk of
# steps (one W_ih packed); B=16, H=64 too, with the first step's recurrent product beside the
# chunk's projection (layer_loop.h, overlap_first_step). I=41: an odd k.
SHAPES = {"fused": (32, 128), "chunked": (5, 24), "overlapped": (16, 64)}
PACKS = {"fused": 2, "chunked": 1, "overlapped": 1}
IN, STEPS = 41, 6
LAYER_CASES = list(itertools.product(OP_CELLS, SHAPES, (False, True), (False, True)))


@pytest.mark.parametrize("cell,shape,reverse,packed", LAYER_CASES,
                         ids=[f"{c}-{s}-{'rev' if r else 'fwd'}-{'packed' if p else 'padded'}"
                              for c, s, r, p in LAYER_CASES])
def test_layer_op_takes_the_bf16_route(cell, shape, reverse, packed):
    """The route runs (its weights are packed: the profiler sees rnnext::bf16_pack) with the
    option on, not off. The forward op's float32 workspace (the gates) on and off: within
    float32 rounding of each other, not the same bits; outputs within a bfloat16 rounding."""
    batch, hidden = SHAPES[shape]
    sizes = sorted(range(1, batch + 1), reverse=True)
    batch_sizes = [batch, batch, sizes[batch // 2], sizes[batch // 2], 2, 1] if packed else None
    args = op_args(cell, dtype=BF16, reverse=reverse, requires_grad=False, batch_sizes=batch_sizes, steps=STEPS,
                   batch=batch, input_size=IN, hidden_size=hidden)
    on, packs = packs_of(lambda: forward_op(cell)(*args, True))
    assert packs == PACKS[shape], "the bfloat16 route did not run as planned"
    with cpu_option("bf16_gemm", "0"):
        off, packs = packs_of(lambda: forward_op(cell)(*args, True))
    assert packs == 0
    ws_on, ws_off = on[-1], off[-1]
    assert ws_on.dtype == torch.float32
    if ws_on.numel():  # (the RNN saves no gates)
        assert not torch.equal(ws_on, ws_off), "the gates have the float32 route's bits"
        assert bool(((ws_on - ws_off).abs() <= 1e-5 * ws_off.abs().clamp(min=1)).all())
    for a, b in zip(on[:-1], off[:-1]):
        if a.numel():
            assert bool(((a.float() - b.float()).abs() <= 2 ** -7 * b.float().abs().clamp(min=1)).all())


def test_chunks_after_the_first():
    """Chunks of 7 rows (rnnext._C.cpu_option "chunk_rows"), so most start past row 0 of x:
    the same bits as one chunk, since each row's sum does not depend on the chunking."""
    args = op_args("gru", dtype=BF16, requires_grad=False, steps=STEPS, batch=5, input_size=IN, hidden_size=24)
    whole = forward_op("gru")(*args, True)
    with cpu_option("chunk_rows", "7"):
        chunked, packs = packs_of(lambda: forward_op("gru")(*args, True))
    assert packs == 1
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", OP_CELLS)
def test_input_size_zero(cell, packed):
    """I = 0 (the ops take it; torch.nn's modules do not): gi is the bias alone, the same bits
    with the route on or off."""
    args = op_args(cell, dtype=BF16, requires_grad=False, steps=5, batch=4, input_size=0, hidden_size=8,
                   batch_sizes=[4, 4, 3, 2, 1] if packed else None)
    on, packs = packs_of(lambda: forward_op(cell)(*args, True))
    assert packs == 1
    with cpu_option("bf16_gemm", "0"):
        off = forward_op(cell)(*args, True)
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def packs_of(fn):
    """fn's result and how many bfloat16 weights it packed (profiler events rnnext::bf16_pack)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(e.name == "rnnext::bf16_pack" for e in prof.events())


def test_one_and_two_step_calls_keep_the_float32_route():
    """Fewer than 3 steps: no weight is packed, so the input projection stays float32 (the
    same bits with the route on or off)."""
    for steps in (1, 2):
        args = op_args("lstm", dtype=BF16, requires_grad=False, steps=steps, batch=32, input_size=IN,
                       hidden_size=128)
        on, packs = packs_of(lambda: forward_op("lstm")(*args, True))
        assert packs == 0
        with cpu_option("bf16_gemm", "0"):
            off = forward_op("lstm")(*args, True)
        assert all(torch.equal(a, b) for a, b in zip(on, off))


# RNN_RELU at the chunked size only: two bidirectional ReLU layers of 64 or 128 units amplify
# bfloat16 rounding so that rnnext's and torch.nn's errors are both 10-20 % of the scale, and
# which is larger is chance: measured with the route on and off alike (H=128 fails either way;
# H=64 passes on torch 2.13 and fails on 2.4.1 either way). Its route is tested above.
MODULE_CASES = [(c, s) for c, s in itertools.product(CELLS, SHAPES) if c != "RNN_RELU" or s == "chunked"]


@pytest.mark.parametrize("cell,shape", MODULE_CASES, ids=[f"{c}-{s}" for c, s in MODULE_CASES])
def test_bf16_layers_as_accurate_as_torch(cell, shape):
    """Two bidirectional bfloat16 layers, padded with initial states and packed, forward and
    backward, against the float64 oracle: rnnext's error within half_allowance of torch.nn's."""
    batch, hidden = SHAPES[shape]
    ref64, _ = make_pair(cell, IN, hidden, dtype=F64, num_layers=2, bidirectional=True)
    ref_h, ours_h, oracle = half_twins(ref64, "cpu", BF16)
    x, hx = make_inputs(oracle, with_hx=True, seq_len=STEPS, batch=batch)
    x, hx = rounded(x, BF16), rounded(hx, BF16)
    x_h, hx_h = to_device(x, "cpu", BF16), to_device(hx, "cpu", BF16)
    expected = run(oracle, x, hx, loss_dtype=BF16)
    assert_half_within(expected, run(ref_h, x_h, hx_h, loss_dtype=BF16), run(ours_h, x_h, hx_h, loss_dtype=BF16),
                       BF16, "cpu", f"{cell} {shape} padded")
    lengths = [STEPS - (i % STEPS) for i in range(batch)]
    expected = run_packed(oracle, x, lengths, hx, False, loss_dtype=BF16)
    assert_half_within(expected, run_packed(ref_h, x_h, lengths, hx_h, False, loss_dtype=BF16),
                       run_packed(ours_h, x_h, lengths, hx_h, False, loss_dtype=BF16), BF16, "cpu",
                       f"{cell} {shape} packed")

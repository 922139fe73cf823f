"""The CPU per-step float32 GEMM (csrc/cpu/packed_gemm.h) on every route this CPU has: the
AVX-512 kernel, the AVX2 kernel and the BLAS (the library's sgemm).

* torch.ops.rnnext._step_gemm runs one product on a named route, at sizes that reach each
  kernel's remainder paths: row blocks of every height (the AVX2 kernel's 6-row tiles and
  their 7-9-row splits, the AVX-512 kernel's even blocks of up to 9 rows, and its 4-strip
  groups below 4 rows), partial last strips (n not a multiple of 16 or 48), a second and a
  partial K block (k > 256), and strided rows of A and C. The oracle is the product in
  float64, with the bound on float32 rounding of a k-term dot product; nothing past the
  last column of C is written.
* Both own kernels sum each element in the same order, so they give the same bits, and the
  same bits run to run and with the product split across 1 or 2 threads.
* Layers through each route (rnnext._C.cpu_option("own_gemm", route) switches it) match
  torch.nn.
* The few-row kernels (small_nt, small_nn, small_tn) and the weight gradients' oneDNN route
  (onednn_tn) likewise, on _step_gemm and in layers; the backward's oneDNN products counted
  in layers on either side of their size threshold.

A route this CPU lacks is skipped with the reason (absent hardware: AVX-512 or AVX2).
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (CELLS, assert_results_close, assert_results_equal, cpu_option, make_inputs, make_pair,
                     require_gemm_route, run)
from rnnext import _C

ROUTES = ("avx512", "avx2", "blas")
OWN = ("avx512", "avx2")
ROWS = list(range(1, 21)) + [25, 35, 64]
COLS = (1, 15, 16, 17, 33, 47, 48, 49, 64, 100, 191)
DEPTHS = (1, 3, 256, 257, 600)


def operands(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    # A as rows of a wider matrix (lda = k + 3), W as a transposed view (packed from any strides).
    a = torch.randn(m, k + 3, generator=g)[:, :k]
    w = torch.randn(k, n, generator=g).t()
    c = torch.randn(m, n, generator=g)
    return a, w, c


def reference(a, w, c, accumulate):
    """The product in float64, and the bound on its float32 rounding: each element is a sum of
    k products (plus c), so |error| <= (k + 2) * 2^-24 * (|a| @ |w|^T + |c|) with margin."""
    exact = a.double() @ w.double().t() + (c.double() if accumulate else 0)
    scale = a.double().abs() @ w.double().abs().t() + (c.double().abs() if accumulate else 0)
    return exact, (a.shape[1] + 2) * 2.0 ** -24 * scale + 1e-30


@pytest.mark.parametrize("route", ROUTES)
def test_step_gemm_matches_float64(route):
    require_gemm_route(route)
    for m, n, k in itertools.product(ROWS, COLS, DEPTHS):
        a, w, c = operands(m, n, k, seed=m * 1000 + n * 10 + k)
        # W as a transposed view, and row-major (packed from rows: pack()'s other path)
        for accumulate, w in ((False, w), (True, w), (False, w.contiguous())):
            got = torch.ops.rnnext._step_gemm(a, w, c, route, accumulate)
            padding = torch.empty(0).set_(got.untyped_storage(), 0, (m, n + 5), (n + 5, 1))[:, n:]
            assert bool(padding.isnan().all()), f"{route} m={m} n={n} k={k}: wrote past column n"
            exact, bound = reference(a, w, c, accumulate)
            err = (got.double() - exact).abs()
            assert bool((err <= bound).all()), (
                f"{route} m={m} n={n} k={k} accumulate={accumulate}: error {err.max().item():.3e} over the "
                f"rounding bound by a factor {(err / bound).max().item():.2f}")


@pytest.mark.parametrize("route", ROUTES)
def test_step_gemm_chunk_sized_products(route):
    """Chunk-sized products (the input projection of a chunk of steps: the AVX-512 kernel
    takes up to 4096 rows), multi-threaded over strips, with partial strips and K blocks."""
    require_gemm_route(route)
    for m, n, k in ((300, 100, 257), (1000, 191, 40), (4096, 49, 3), (64, 1000, 600)):
        a, w, c = operands(m, n, k, seed=m)
        for w in (w, w.contiguous()):  # packed from either layout, strips split across threads
            got = torch.ops.rnnext._step_gemm(a, w, c, route, True)
            exact, bound = reference(a, w, c, True)
            err = (got.double() - exact).abs()
            assert bool((err <= bound).all()), f"{route} m={m} n={n} k={k}: {(err / bound).max().item():.2f}x the bound"


@pytest.mark.parametrize("route", ROUTES)
def test_step_gemm_bias_as_stored_tile_matches_a_copied_bias(route):
    """A bias added as each tile is stored (StepWeight::multiply_bias on our kernels; the BLAS
    route copies it into C first) gives the bits of C started from the bias and accumulated,
    in whole strips, lane-masked and buffered partial strips and second K blocks, and writes
    nothing past column n."""
    require_gemm_route(route)
    for m, n, k in itertools.product((1, 3, 4, 7, 9, 10, 64), (1, 15, 16, 17, 48, 49, 100), (1, 256, 257)):
        a, w, _ = operands(m, n, k, seed=m * 1000 + n * 10 + k)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
        got = torch.ops.rnnext._step_gemm(a, w, torch.zeros(m, n), route, False, bias)
        padding = torch.empty(0).set_(got.untyped_storage(), 0, (m, n + 5), (n + 5, 1))[:, n:]
        assert bool(padding.isnan().all()), f"{route} m={m} n={n} k={k}: wrote past column n"
        started = torch.ops.rnnext._step_gemm(a, w, bias.expand(m, n).contiguous(), route, True)
        assert torch.equal(got, started), f"{route} m={m} n={n} k={k}"
        exact, bound = reference(a, w, bias.expand(m, n), True)
        assert bool(((got.double() - exact).abs() <= bound).all()), f"{route} m={m} n={n} k={k}"


def test_step_gemm_bias_checked():
    a, w, c = operands(2, 3, 4, seed=0)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.rnnext._step_gemm(a, w, c, "blas", True, torch.zeros(3))  # with accumulate
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.rnnext._step_gemm(a, w, c, "blas", False, torch.zeros(4))  # not [n]
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.rnnext._step_gemm(a, w, c, "small_nt", False, torch.zeros(3))  # not a per-step route


# The few-row kernels of a weight used once or twice (gemm.h), in float32 and float64: rows
# reaching every row group (4 at a time, then 3, 2, 1) up to the BLAS hand-over (32 rows), W's
# rows in groups of 4 and alone (small_gemm_nt, and small_gemm_tn, the weight gradients'
# d^T @ x over k rows) or columns in whole and partial vectors and single elements
# (small_gemm_nn and small_gemm_tn), depths with and without a lane tail (k % 16, k % 8).
SMALL_ROUTES = ("small_nt", "small_nn", "small_tn")
SMALL_ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 32)
SMALL_COLS = (1, 3, 4, 5, 8, 17, 33, 64, 100)
SMALL_DEPTHS = (1, 7, 8, 16, 17, 64, 100)


def small_operands(m, n, k, dtype, seed):
    a, w, c = operands(m, n, k, seed)
    return a.to(dtype), w.to(dtype), c.to(dtype)


# Vector widths of the few-row kernels (bytes) and the instruction set each needs.
SMALL_WIDTHS = {"64": "avx512", "32": "avx2", "16": "blas"}


@pytest.mark.parametrize("width", SMALL_WIDTHS)
@pytest.mark.parametrize("route", SMALL_ROUTES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("float32", "float64"))
def test_small_kernels_match_float64(route, dtype, width):
    require_gemm_route(SMALL_WIDTHS[width])
    unit = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -53
    for m, n, k in itertools.product(SMALL_ROWS, SMALL_COLS, SMALL_DEPTHS):
        a, w, c = small_operands(m, n, k, dtype, seed=m * 1000 + n * 10 + k)
        for accumulate in (False, True):
            got = torch.ops.rnnext._step_gemm(a, w, c, f"{route}@{width}", accumulate)
            assert got.dtype == dtype
            padding = torch.empty(0, dtype=dtype).set_(got.untyped_storage(), 0, (m, n + 5), (n + 5, 1))[:, n:]
            assert bool(padding.isnan().all()), f"{route} m={m} n={n} k={k}: wrote past column n"
            exact = a.double() @ w.double().t() + (c.double() if accumulate else 0)
            scale = a.double().abs() @ w.double().abs().t() + (c.double().abs() if accumulate else 0)
            bound = (k + 2) * unit * scale + 1e-300
            err = (got.double() - exact).abs()
            assert bool((err <= bound).all()), (
                f"{route} {dtype} m={m} n={n} k={k} accumulate={accumulate}: "
                f"{(err / bound).max().item():.2f}x the rounding bound")


@pytest.mark.parametrize("width", SMALL_WIDTHS)
@pytest.mark.parametrize("route", SMALL_ROUTES)
def test_small_kernels_same_bits_run_to_run_and_across_threads(route, width):
    """Large enough to be split across threads: [4, 700] x [700, 1000] by columns, or a
    [1000, 700] weight gradient over 8 rows (small_tn) by rows."""
    require_gemm_route(SMALL_WIDTHS[width])
    m, n, k = (1000, 700, 8) if route == "small_tn" else (4, 1000, 700)
    a, w, c = small_operands(m, n, k, torch.float32, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = torch.ops.rnnext._step_gemm(a, w, c, f"{route}@{width}", True)
        second = torch.ops.rnnext._step_gemm(a, w, c, f"{route}@{width}", True)
        torch.set_num_threads(1)
        single = torch.ops.rnnext._step_gemm(a, w, c, f"{route}@{width}", True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(first, second)
    assert torch.equal(first, single)


@pytest.mark.parametrize("width", SMALL_WIDTHS)
def test_small_nt_groups_of_four_sum_as_single_columns(width):
    """A column's dot product has the same bits whether its W row is in a tile of four or
    alone, and whichever rows of A share its tile: column 4 is alone in a 5-column product and
    grouped in an 8-column one; row 2 of A is in a tile of 3 rows, or alone."""
    require_gemm_route(SMALL_WIDTHS[width])
    route = f"small_nt@{width}"
    a, w, c = small_operands(3, 8, 100, torch.float32, seed=9)
    alone = torch.ops.rnnext._step_gemm(a, w[:5], c[:, :5], route, False)
    grouped = torch.ops.rnnext._step_gemm(a, w, c, route, False)
    assert torch.equal(alone[:, 4], grouped[:, 4])
    single_row = torch.ops.rnnext._step_gemm(a[2:], w, c[2:], route, False)
    assert torch.equal(single_row[0], grouped[2])


def test_small_kernel_widths_are_checked():
    with pytest.raises(ValueError, match="16, 32 or 64"):
        torch.ops.rnnext._step_gemm(torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, 1), "small_nt@8", False)


# One step of a layer (a weight used once, multiplied as it is): batches on each side of the
# few-row kernels' limits with AVX-512 (8 and 16 rows forward, 16 and 32 backward, 8 and 32
# for the weight gradients, float64's 32 only below 2^18 elements; fewer with narrower
# vectors), k = 512 reaching the forward's 16-row limit; outputs, states and every gradient
# against torch.nn.
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("float32", "float64"))
def test_one_step_layers_on_the_unpacked_kernels(cell, dtype):
    for batch, hidden in ((1, 40), (3, 40), (8, 40), (9, 40), (16, 512), (17, 40), (32, 40), (33, 40)):
        ref, ours = make_pair(cell, 40 if hidden == 40 else 512, hidden, dtype=dtype, seed=batch)
        x, hx = make_inputs(ref, with_hx=True, seq_len=1, batch=batch)
        assert_results_close(run(ref, x, hx), run(ours, x, hx), f"{cell} {dtype} B={batch} H={hidden}",
                             scale_atol=True)


def test_own_kernels_give_the_same_bits():
    require_gemm_route("avx512")
    require_gemm_route("avx2")
    for m, n, k in itertools.product(ROWS, COLS, DEPTHS):
        a, w, c = operands(m, n, k, seed=m + n + k)
        for accumulate in (False, True):
            x = torch.ops.rnnext._step_gemm(a, w, c, "avx512", accumulate)
            y = torch.ops.rnnext._step_gemm(a, w, c, "avx2", accumulate)
            assert torch.equal(x, y), f"m={m} n={n} k={k} accumulate={accumulate}: {(x - y).abs().max().item():.3e}"


@pytest.mark.parametrize("route", OWN)
def test_step_gemm_same_bits_run_to_run_and_across_threads(route):
    """[64, 1024] x [1024, 1000]: large enough that multiply() splits the strips across threads
    (1000 columns: 62 full strips and a partial one)."""
    require_gemm_route(route)
    a, w, c = operands(64, 1000, 1024, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = torch.ops.rnnext._step_gemm(a, w, c, route, True)
        second = torch.ops.rnnext._step_gemm(a, w, c, route, True)
        torch.set_num_threads(1)
        single = torch.ops.rnnext._step_gemm(a, w, c, route, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(first, second)
    assert torch.equal(first, single)
    exact, bound = reference(a, w, c, True)
    assert bool(((first.double() - exact).abs() <= bound).all())


# Batch sizes that reach every row-block height of both kernels; H=152: 608 LSTM columns
# (12 groups of 48 and 2 strips more), a partial K block.
LAYER_BATCHES = (1, 3, 8, 13, 35)
LAYERS = list(itertools.product(CELLS, ROUTES))


@pytest.mark.parametrize("cell,route", LAYERS, ids=[f"{c}-{r}" for c, r in LAYERS])
def test_layers_match_torch_on_each_route(cell, route):
    require_gemm_route(route)
    with cpu_option("own_gemm", route):
        assert _C.cpu_option("own_gemm") == route
        for batch in LAYER_BATCHES:
            ref, ours = make_pair(cell, 40, 152, dtype=torch.float32, num_layers=2, bidirectional=True, seed=batch)
            x, hx = make_inputs(ref, with_hx=True, seq_len=5, batch=batch)
            assert_results_close(run(ref, x, hx), run(ours, x, hx), f"{cell} {route} B={batch}", scale_atol=True)


@pytest.mark.parametrize("cell", CELLS)
def test_layers_same_bits_on_both_own_kernels(cell):
    """T=5, B=13 keeps every product on the per-step kernel (the input projection's chunk has
    65 rows), so the two kernels' identical sum order gives identical layers, forward and
    backward."""
    require_gemm_route("avx512")
    require_gemm_route("avx2")
    _, ours = make_pair(cell, 40, 152, dtype=torch.float32, num_layers=2, bidirectional=True)
    x, hx = make_inputs(ours, with_hx=True, seq_len=5, batch=13)
    results = {}
    for route in OWN:
        with cpu_option("own_gemm", route):
            results[route] = run(ours, x, hx)
    assert_results_equal(results["avx512"], results["avx2"], what=cell)


def test_own_gemm_names():
    with cpu_option("own_gemm", "blas"):
        assert _C.cpu_option("own_gemm") == "blas"
        assert _C.cpu_option("own_gemm", "auto") in OWN + ("blas",)
        with pytest.raises(ValueError, match="expected auto, avx512, avx2 or blas"):
            _C.cpu_option("own_gemm", "sse")
    with pytest.raises(ValueError, match="route='fast'"):
        torch.ops.rnnext._step_gemm(torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, 1), "fast", False)


def test_step_gemm_checks_its_arguments():
    with pytest.raises(RuntimeError, match="shapes"):
        torch.ops.rnnext._step_gemm(torch.ones(2, 3), torch.ones(4, 5), torch.zeros(2, 4), "blas", False)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.rnnext._step_gemm(torch.ones(2, 3).double(), torch.ones(4, 3), torch.zeros(2, 4), "blas", False)




# The weight gradients' oneDNN route (gemm.h, TransposedProduct: d^T @ x as oneDNN's matmul
# on d^T as it lies in d's storage, and x with rows wider than its columns), forced at any
# size: sizes off oneDNN's block multiples, and the smallest ones.
ONEDNN_TN = ((1, 1, 1), (17, 33, 5), (100, 49, 300), (2049, 515, 1030))

LINEAR, MATMUL, MM = "mkldnn::_linear_pointwise", "rnnext::onednn_matmul", "aten::mm"


def _onednn_calls(fn):
    """fn's result, and {name: calls} of the products it ran through the dispatcher or the
    profiler: oneDNN linear with a prepacked weight (OneDnnLinear, grad_x on AVX2 CPUs),
    rnnext's oneDNN matmul, and at::mm (the fallback: a oneDNN matmul that failed would
    show as both)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {name: sum(e.name == name for e in prof.events()) for name in (LINEAR, MATMUL, MM)}


def _cpu_takes_matmul():
    """The CPU has what gemm.h's OneDnnMatmul asks for float32: AVX-512 BW, VL and DQ."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512bw", "avx512vl", "avx512dq"} <= set(flags)


def _matmul_route():
    """oneDNN's matmul takes float32 products here, as gemm.h's OneDnnMatmul::route decides:
    the CPU's flags, a torch with oneDNN, and the route not turned off."""
    return (_cpu_takes_matmul() and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and _C.cpu_option("onednn") == "1")


def test_onednn_weight_gradient_route_matches_float64():
    for m, n, k in ONEDNN_TN:
        a, w, c = operands(m, n, k, seed=m + n + k)
        for accumulate in (False, True):
            got, calls = _onednn_calls(lambda: torch.ops.rnnext._step_gemm(a, w, c, "onednn_tn", accumulate))
            # Where oneDNN's matmul does not take float32 (AVX2 CPUs) the route is at::mm,
            # which must be right too.
            matmul = int(_matmul_route())
            assert calls == {LINEAR: 0, MATMUL: matmul, MM: 1 - matmul}, (m, n, k)
            exact, bound = reference(a, w, c, accumulate)
            err = (got.double() - exact).abs()
            assert bool((err <= 2 * bound).all()), f"m={m} n={n} k={k}: {(err / bound).max().item():.2f}x the bound"


def test_onednn_weight_gradient_route_same_bits_run_to_run():
    a, w, c = operands(2049, 515, 1030, seed=4)
    first = torch.ops.rnnext._step_gemm(a, w, c, "onednn_tn", False)
    second = torch.ops.rnnext._step_gemm(a, w, c, "onednn_tn", False)
    assert torch.equal(first, second)


@pytest.mark.parametrize("cell", ("LSTM", "GRU"))
def test_layers_with_large_weight_gradients_match_torch(cell):
    """A layer whose backward products are large enough for oneDNN (gemm.h): on an AVX-512
    CPU grad_x, dW_ih and dW_hh through oneDNN's matmul, on an AVX2 CPU grad_x through
    oneDNN linear and the weight gradients through at::mm. Every gradient against torch.nn,
    the same bits run to run, and close to the routes with oneDNN off (at::mm)."""
    hidden = 512 if cell == "LSTM" else 683  # 2048 and 2049 gate columns
    ref, ours = make_pair(cell, 520, hidden, dtype=torch.float32, seed=2)
    x, hx = make_inputs(ref, with_hx=True, seq_len=16, batch=64)
    first, calls = _onednn_calls(lambda: run(ours, x, hx))
    if torch.backends.mkldnn.is_available() and _C.cpu_option("onednn") == "1":
        matmul = _matmul_route()  # else grad_x by oneDNN linear, the weight gradients by at::mm
        assert calls == ({LINEAR: 0, MATMUL: 3, MM: 0} if matmul else {LINEAR: 1, MATMUL: 0, MM: 2})
    assert_results_close(run(ref, x, hx), first, f"{cell} large", scale_atol=True)
    assert_results_equal(first, run(ours, x, hx), what=f"{cell} run to run")
    with cpu_option("onednn", "0"):
        plain, calls = _onednn_calls(lambda: run(ours, x, hx))
    assert calls == {LINEAR: 0, MATMUL: 0, MM: 3}
    was_enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:  # torch's own switch turns rnnext's oneDNN off too
        _, calls = _onednn_calls(lambda: run(ours, x, hx))
    finally:
        torch.backends.mkldnn.enabled = was_enabled
    assert calls == {LINEAR: 0, MATMUL: 0, MM: 3}
    assert_results_close(plain, first, f"{cell} oneDNN vs at::mm", scale_atol=True)


# Run in a fresh process whose oneDNN is capped below AVX-512 (ONEDNN_MAX_CPU_ISA, read once
# when oneDNN starts), so that torch's mkldnn_matmul refuses float32 on a CPU where gemm.h
# routes it: the backward must warn once, in one line, finish on at::mm, and leave the route.
_MATMUL_FAILURE_SCRIPT = r"""
import warnings
import torch
from helpers import assert_results_close, make_inputs, make_pair, run
from test_cpu_gemm import LINEAR, MATMUL, MM, _onednn_calls
ref, ours = make_pair("LSTM", 520, 512, dtype=torch.float32, seed=2)
x, hx = make_inputs(ref, with_hx=True, seq_len=16, batch=64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first, calls = _onednn_calls(lambda: run(ours, x, hx))
    again, calls_again = _onednn_calls(lambda: run(ours, x, hx))
failed = [str(w.message) for w in caught if "oneDNN's matmul failed" in str(w.message)]
assert len(failed) == 1, failed
assert "\n" not in failed[0] and "frame #" not in failed[0], failed[0]
assert calls[MATMUL] == 1 and calls[MM] == 3, calls  # the failed call, then at::mm for all three
# the route stays off: grad_x by oneDNN linear, the weight gradients by at::mm, as on AVX2
assert calls_again == {LINEAR: 1, MATMUL: 0, MM: 2}, calls_again
assert_results_close(run(ref, x, hx), first, "LSTM after the fallback", scale_atol=True)
assert_results_close(first, again, "LSTM on at::mm, run to run", scale_atol=True)
print("fell back")
"""


def test_onednn_matmul_failure_warns_once_and_falls_back_to_mm():
    if not _cpu_takes_matmul():
        pytest.skip("no AVX-512 BW/VL/DQ on this CPU: rnnext never routes to oneDNN's matmul here")
    tests_dir = Path(__file__).resolve().parent
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", RNNEXT_ONEDNN="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir.parent), str(tests_dir)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", _MATMUL_FAILURE_SCRIPT], cwd=str(tests_dir), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "fell back" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("cell", ("LSTM", "GRU", "RNN_TANH"))
def test_layers_at_the_matmul_threshold_match_torch(cell):
    """Backward products on either side of OneDnnMatmul::kMinWork (2^24 multiply-adds): a
    sequence whose grad_x and weight gradients just reach it and one just short of it (at::mm),
    each against torch.nn, the calls counted."""
    gates = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1}[cell]
    hidden, inp, batch, min_work = 64, 64, 64, 1 << 24
    work_per_row = gates * hidden * inp  # grad_x's and each weight gradient's multiply-adds per row
    for seq_len in (-(-min_work // (work_per_row * batch)), min_work // (work_per_row * batch) - 1):
        ref, ours = make_pair(cell, inp, hidden, dtype=torch.float32, seed=seq_len)
        x, hx = make_inputs(ref, with_hx=True, seq_len=seq_len, batch=batch)
        got, calls = _onednn_calls(lambda: run(ours, x, hx))
        reached = seq_len * batch * work_per_row >= min_work
        assert calls[MATMUL] == (3 if reached and _matmul_route() else 0), (seq_len, calls)
        assert_results_close(run(ref, x, hx), got, f"{cell} T={seq_len}", scale_atol=True)


@pytest.mark.parametrize("cell,seq_len", [("LSTM", 26), ("GRU", 32)])
def test_large_workspace_written_by_streaming_stores_matches_torch(cell, seq_len):
    """A training workspace of 32 MiB or more (H=1024, 64 rows a step: 20 or 16 KiB a row) is
    written through an in-cache row and non-temporal stores (layer_loop.h, stream_values),
    with the units in several blocks: every gradient against torch.nn."""
    ref, ours = make_pair(cell, 64, 1024, dtype=torch.float32, seed=1)
    x, hx = make_inputs(ref, with_hx=True, seq_len=seq_len, batch=64)
    assert seq_len * 64 * (5 if cell == "LSTM" else 4) * 1024 * 4 >= 32 << 20
    assert_results_close(run(ref, x, hx), run(ours, x, hx), f"{cell} streamed workspace", scale_atol=True)

"""Threads, leaks, long sequences, the BLAS rnnext calls and its scratch memory."""
import os
import subprocess
import sys
import threading
import time

import torch

import rnnext
from helpers import F32, make_pair, tolerance


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _train_step(model, x):
    x = x.clone().requires_grad_()
    out, state = model(x)
    h = state[0] if isinstance(state, tuple) else state
    (out.square().sum() + h.sum()).backward()
    return out.detach(), x.grad


def test_threads_give_serial_results():
    torch.manual_seed(0)
    models = [rnnext.LSTM(6, 8, num_layers=2), rnnext.GRU(6, 8, bidirectional=True), rnnext.RNN(6, 8)]
    inputs = [torch.randn(7, 3, 6) for _ in range(6)]
    # Serial reference first; each thread runs its own model and input, so gradients of the
    # inputs (not the shared parameters) are compared.
    expected = [_train_step(models[i % 3], inputs[i]) for i in range(6)]
    results = [None] * 6

    def work(i):
        for _ in range(5):
            results[i] = _train_step(models[i % 3], inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (out, gx), (e_out, e_gx) in zip(results, expected):
        assert torch.equal(out, e_out)
        assert torch.equal(gx, e_gx)


def test_no_memory_growth_over_10000_calls():
    torch.manual_seed(0)
    model = rnnext.GRU(4, 8)
    x = torch.randn(3, 2, 4, requires_grad=True)
    for _ in range(300):  # warm up allocator caches
        out, h = model(x)
        (out.sum() + h.sum()).backward()
    before = _rss_mib()
    for _ in range(10_000):
        out, h = model(x)
        (out.sum() + h.sum()).backward()
    grown = _rss_mib() - before
    # A leak of even one small tensor per call (3*2*8 floats) would be ~2 MiB here; the
    # workspace alone (~8 KiB a call) would be ~80 MiB.
    assert grown < 8, f"resident memory grew by {grown:.1f} MiB over 10,000 calls"


def test_long_sequence_20000_steps():
    ref, ours = make_pair("LSTM", 3, 4, dtype=F32, via="from_torch")
    x = torch.randn(20_000, 1, 3)
    out, (h, c) = ours(x)
    r_out, (r_h, r_c) = ref(x)
    torch.testing.assert_close(out, r_out, **tolerance("cpu", F32))
    torch.testing.assert_close(c, r_c, **tolerance("cpu", F32))
    # Gradients through all 20,000 steps: the input's and every parameter's equal torch.nn's
    # (parameter gradients sum 20,000 float32 terms: the bound scales with their magnitude).
    loss_grad = torch.randn(20_000, 1, 4, generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (ref, ours):
        xg = x.clone().requires_grad_()
        m.zero_grad(set_to_none=True)
        m(xg)[0].backward(loss_grad)
        grads.append([xg.grad] + [p.grad for p in m.parameters()])
    for r_g, o_g in zip(*grads):
        tol = tolerance("cpu", F32)
        torch.testing.assert_close(o_g, r_g, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, r_g.abs().max().item()))


def test_bitwise_deterministic_run_to_run():
    """Same inputs, same results to the bit: an LSTM whose steps are split across threads and
    whose products run on rnnext's own GEMM (B=32), and a small bidirectional GRU whose
    products go to the small kernel (B=3)."""
    torch.manual_seed(0)
    for model, x in ((rnnext.LSTM(64, 256), torch.randn(6, 32, 64)),
                     (rnnext.GRU(16, 32, bidirectional=True), torch.randn(5, 3, 16))):
        first = _train_step(model, x)
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        second = _train_step(model, x)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        for g, p in zip(grads, model.parameters()):
            assert torch.equal(g, p.grad)


_FAKE_BLAS = r"""
#include <stdlib.h>
void sgemm_(void) { abort(); }
void dgemm_(void) { abort(); }
void cblas_sgemm_pack_get_size(void) { abort(); }
void cblas_sgemm_pack(void) { abort(); }
void cblas_sgemm_compute(void) { abort(); }
"""

_USE_FAKE_BLAS = r"""
import ctypes, sys
import torch, rnnext
from rnnext import _C
from helpers import assert_results_close, make_inputs, make_pair, run
CASES = [(dtype, batch) for dtype in (torch.float64, torch.float32) for batch in (2, 8, 300)]
def pair(dtype, batch):
    ref, ours = make_pair("LSTM", 6, 10, dtype=dtype, seed=batch)
    return ref, ours, make_inputs(ref, with_hx=True, seq_len=5, batch=batch)
# torch.nn first, so torch's own (lazily bound) calls into its BLAS are bound before the
# foreign library exists; rnnext has not looked up its BLAS yet.
expected = [run(ref, x, hx) for ref, _, (x, hx) in (pair(*case) for case in CASES)]
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)  # a foreign BLAS, in the global scope
_C.cpu_option("own_gemm", "blas")  # float32 per-step products on sgemm_ / MKL's packed GEMM too
for case, exp in zip(CASES, expected):
    _, ours, (x, hx) = pair(*case)
    assert_results_close(exp, run(ours, x, hx), str(case), scale_atol=True)
print("ok")
"""


def test_blas_is_the_one_torch_links(tmp_path):
    """A library loaded with global symbols before rnnext, exporting sgemm_/dgemm_ and MKL's
    packed-GEMM entry points that abort, is never called: rnnext looks its BLAS up in
    libtorch_cpu and its dependencies (csrc/cpu/gemm.h, torch_blas_symbol)."""
    import shutil
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler is needed to build the foreign BLAS (it builds rnnext too)"
    src, lib = tmp_path / "fake_blas.c", tmp_path / "libfake_blas.so"
    src.write_text(_FAKE_BLAS)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    script = tmp_path / "use_fake_blas.py"
    script.write_text(_USE_FAKE_BLAS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script), str(lib)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _chunked_forward(model, x):
    with torch.no_grad():
        return model(x)[0]


def test_empty_cache_releases_the_scratch_and_results_stay():
    """B=8 takes the chunked input projection, whose buffer each thread keeps between calls
    (csrc/cpu/scratch.h): rnnext.empty_cache() releases it, and the next call is unchanged."""
    torch.manual_seed(0)
    model = rnnext.LSTM(64, 256)
    x = torch.randn(600, 8, 64)
    first = _chunked_forward(model, x)
    kept = rnnext._C.scratch_bytes()
    assert kept >= 1024 * 4 * 256 * 4  # a chunk of 1,024 rows of 4 gates x 256 units
    assert rnnext.empty_cache() == kept
    assert rnnext._C.scratch_bytes() == 0
    assert torch.equal(_chunked_forward(model, x), first)


def test_scratch_is_bounded_across_threads_and_freed_when_they_exit():
    """40 threads, each keeping a ~4 MiB buffer at once, keep no more than 128 MiB together
    (the rest use theirs once); a thread's buffer goes when it exits."""
    rnnext.empty_cache()
    torch.manual_seed(0)
    model = rnnext.LSTM(64, 256)
    x = torch.randn(600, 8, 64)
    expected = _chunked_forward(model, x)
    main_thread = rnnext._C.scratch_bytes()  # this thread's buffer
    assert main_thread >= 4 << 20
    n = 40
    ran, done = threading.Barrier(n + 1), threading.Barrier(n + 1)
    results = [None] * n

    def worker(i):
        results[i] = _chunked_forward(model, x)
        ran.wait()
        done.wait()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ran.wait()
    held = rnnext._C.scratch_bytes()
    done.wait()
    for t in threads:
        t.join()
    # Unbounded, 41 threads would keep 41 x 4 MiB: the bound is what stops them.
    assert 41 * main_thread > 128 << 20
    assert 128 << 20 >= held >= (128 << 20) - main_thread, held
    # The workers' buffers go with them: as each OS thread ends, which may be just after
    # join() returns (Python marks a thread finished before its C-level exit runs).
    deadline = time.monotonic() + 10
    while rnnext._C.scratch_bytes() != main_thread and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rnnext._C.scratch_bytes() == main_thread
    assert all(torch.equal(r, expected) for r in results)
    rnnext.empty_cache()


def test_pooled_buffers_are_reused_released_and_results_stay():
    """Training buffers of 4 MiB or more (the workspace, the gate gradients) come from a pool
    (csrc/cpu/scratch.h): a second step reuses its blocks (no growth) with the same bits, and
    rnnext.empty_cache() releases them, the next step unchanged."""
    from helpers import assert_results_equal, make_inputs, run
    rnnext.empty_cache()
    _, model = make_pair("LSTM", 64, 256, dtype=F32, seed=3)
    x, hx = make_inputs(model, with_hx=True, seq_len=100, batch=32)  # workspace 3200 x 1280 floats
    first = run(model, x, hx)
    kept = rnnext._C.scratch_bytes()
    assert kept >= 3200 * 1280 * 4
    assert_results_equal(first, run(model, x, hx), what="second step")
    assert rnnext._C.scratch_bytes() == kept
    assert rnnext.empty_cache() == kept
    assert rnnext._C.scratch_bytes() == 0
    assert_results_equal(first, run(model, x, hx), what="after empty_cache")
    rnnext.empty_cache()

"""Threads, leaks and long sequences."""
import threading

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
    xg = x.clone().requires_grad_()
    y, _ = ours(xg)
    y[-1].sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert xg.grad[-1].abs().sum() > 0


def test_bitwise_deterministic_run_to_run():
    """Same inputs, same results to the bit, at a size where the per-step products take the
    oneDNN route (and small ones the BLAS route)."""
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

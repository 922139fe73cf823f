"""What only CUDA has: CUDA autocast, streams, several devices, mixed-device mistakes,
run-to-run determinism of the CUDA kernels, agreement with rnnext's CPU kernels, backward in
eval mode (which cuDNN refuses) and CUDA graph capture. Every test here skips with "no CUDA
device" on a machine without a GPU. float16 and bfloat16 on every device: test_half.py.

The float32/float64 parity of every module, cell and op on CUDA is not repeated here: the
parity files run their tests on both devices (the `device` fixture, conftest.py).
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import (CELLS, F16, F32, F64, OP_CELLS, assert_results_close,
                     assert_results_equal, backward_args, backward_op, forward_op, make_inputs,
                     make_pair, op_args, raised, run, run_packed, to_device, tolerance, HALF, MODULE_CONFIGS)
from rnnext.parity import HALF_ALLOWANCE

IN, HID = 8, 16
STACK = dict(num_layers=2, bidirectional=True)
LENGTHS = [6, 3, 5, 1, 6, 2]  # unsorted: packed with enforce_sorted=False
# Longer and wider, for determinism: more thread blocks, more steps to reduce over.
LONG_T, LONG_B = 20, 32
LONG_LENGTHS = [(7 * i) % LONG_T + 1 for i in range(LONG_B)]


def _on_cuda(res, what=""):
    for key, value in res.items():
        assert value is None or value.device.type == "cuda", f"{what}: {key} is on {value.device}"


# ============================================================================ CUDA against rnnext's CPU kernels
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_float64_matches_rnnext_on_the_cpu(cell, kwargs, packed, cuda_device):
    """The same module in float64 on CUDA and on the CPU: equal within 1e-12 (the host's and
    the device's exp/tanh may differ in the last bit)."""
    _, cpu = make_pair(cell, IN, HID, dtype=F64, **STACK, **kwargs)
    gpu = copy.deepcopy(cpu).to(cuda_device)
    x, hx = make_inputs(cpu, with_hx=True, seq_len=max(LENGTHS), batch=len(LENGTHS))
    x_d, hx_d = to_device(x, cuda_device), to_device(hx, cuda_device)
    if packed:
        expected, got = run_packed(cpu, x, LENGTHS, hx, False), run_packed(gpu, x_d, LENGTHS, hx_d, False)
    else:
        expected, got = run(cpu, x, hx), run(gpu, x_d, hx_d)
    _on_cuda(got, cell)
    assert_results_close(expected, to_device(got, "cpu"), f"{cell} {kwargs} CUDA vs CPU",
                         tol=tolerance(cuda_device, F64))


@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_backward_in_eval_mode_matches_rnnext_on_the_cpu(cell, kwargs, cuda_device):
    """cuDNN refuses backward in eval mode; rnnext must not (dropout is off in eval mode)."""
    _, cpu = make_pair(cell, IN, HID, dtype=F64, dropout=0.5, **STACK, **kwargs)
    cpu.eval()
    gpu = copy.deepcopy(cpu).to(cuda_device)
    assert not gpu.training
    x, hx = make_inputs(cpu, with_hx=True)
    expected = run(cpu, x, hx)
    got = run(gpu, to_device(x, cuda_device), to_device(hx, cuda_device))
    _on_cuda(got, cell)
    assert_results_close(expected, to_device(got, "cpu"), f"{cell} eval-mode backward",
                         tol=tolerance(cuda_device, F64))


# ============================================================================ determinism, streams, devices
def _run_both(module, x, hx, lengths):
    """Padded and packed (unsorted, `lengths`) results of one module, in one dict."""
    res = {f"padded.{k}": v for k, v in run(module, x, hx).items()}
    res.update({f"packed.{k}": v for k, v in run_packed(module, x, lengths, hx, False).items()})
    return res


@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_bitwise_deterministic_run_to_run(cell, kwargs, cuda_device):
    """Same inputs, same bits: outputs, states and every gradient, float32."""
    _, ours = make_pair(cell, 32, 64, dtype=F32, device=cuda_device, **STACK, **kwargs)
    x, hx = make_inputs(ours, with_hx=True, seq_len=LONG_T, batch=LONG_B)
    first = _run_both(ours, x, hx, LONG_LENGTHS)
    second = _run_both(ours, x, hx, LONG_LENGTHS)
    _on_cuda(first, cell)
    assert_results_equal(first, second, what=f"{cell} {kwargs} run to run")


@pytest.mark.parametrize("cell", CELLS)
def test_non_default_stream(cell, cuda_device):
    """Forward and backward under `with torch.cuda.stream(s)` give the default stream's bits.
    The stream first sleeps, then copies the inputs (run() takes fresh leaf copies): a kernel
    launched on another stream than the current one would read them before they exist."""
    _, ours = make_pair(cell, 32, 64, dtype=F32, device=cuda_device, **STACK)
    x, hx = make_inputs(ours, with_hx=True, seq_len=LONG_T, batch=LONG_B)
    expected = _run_both(ours, x, hx, LONG_LENGTHS)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    assert s != torch.cuda.current_stream()
    with torch.cuda.stream(s):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)
        got = _run_both(ours, x, hx, LONG_LENGTHS)
    torch.cuda.synchronize()
    assert_results_equal(expected, got, what=f"{cell} on a side stream")


@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_second_device_gives_the_same_result(cell, kwargs, cuda_device):
    """The module on cuda:1 while cuda:0 is the current device: results on cuda:1, equal to
    those on cuda:0 (bit for bit on two GPUs of one model)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second CUDA device")
    results = []
    for index in (0, 1):
        dev = torch.device("cuda", index)
        _, ours = make_pair(cell, IN, HID, dtype=F32, device=dev, **STACK, **kwargs)
        x, hx = make_inputs(ours, with_hx=True, seq_len=max(LENGTHS), batch=len(LENGTHS))
        with torch.cuda.device(0):
            res = _run_both(ours, x, hx, LENGTHS)
        for key, value in res.items():
            assert value is None or value.device == dev, f"{key} on {value.device}, expected {dev}"
        results.append(to_device(res, "cpu"))
    if torch.cuda.get_device_name(0) == torch.cuda.get_device_name(1):
        assert_results_equal(results[0], results[1], what=f"{cell} cuda:0 vs cuda:1")
    else:
        assert_results_close(results[0], results[1], f"{cell} cuda:0 vs cuda:1", tol=tolerance("cuda", F32))


# ============================================================================ mixed devices
def _assert_raises_like_torch(ref_fn, our_fn, what: str) -> None:
    ref_exc, our_exc = raised(ref_fn), raised(our_fn)
    assert ref_exc is not None, f"{what}: torch.nn accepted it (not a mistake)"
    assert our_exc is not None, f"{what}: rnnext accepted what torch.nn rejects with {ref_exc!r}"
    assert isinstance(our_exc, type(ref_exc)), (
        f"{what}: torch.nn raises {type(ref_exc).__name__} ({ref_exc}); rnnext raises "
        f"{type(our_exc).__name__} ({our_exc})")
    assert isinstance(our_exc, RuntimeError), f"{what}: {our_exc!r}"


@pytest.mark.parametrize("cell", CELLS)
def test_input_on_the_cpu_with_the_module_on_cuda_raises_like_torch(cell, cuda_device):
    ref, ours = make_pair(cell, dtype=F32, device=cuda_device)
    x, _ = make_inputs(ref)
    x = x.cpu()
    _assert_raises_like_torch(lambda: ref(x), lambda: ours(x), f"{cell}: input on the CPU")


@pytest.mark.parametrize("cell", CELLS)
def test_state_on_the_cpu_with_the_input_on_cuda_raises_like_torch(cell, cuda_device):
    ref, ours = make_pair(cell, dtype=F32, device=cuda_device)
    x, hx = make_inputs(ref, with_hx=True)
    assert x.is_cuda
    cases = [(hx[0].cpu(), hx[1]), (hx[0], hx[1].cpu())] if cell == "LSTM" else [hx.cpu()]
    for i, bad in enumerate(cases):
        _assert_raises_like_torch(lambda: ref(x, bad), lambda: ours(x, bad), f"{cell}: state {i} on the CPU")


def test_op_with_w_hh_on_the_cpu_names_it(cuda_device):
    args = list(op_args("gru", requires_grad=False, dtype=F32, device=cuda_device))
    names = [a.name for a in forward_op("gru")._schema.arguments]
    w_hh = names.index("w_hh")
    args[w_hh] = args[w_hh].cpu()
    assert args[0].is_cuda
    with pytest.raises(RuntimeError, match="w_hh"):
        forward_op("gru")(*args)


@pytest.mark.parametrize("cell", OP_CELLS)
def test_ops_with_one_tensor_on_the_cpu_raise(cell, cuda_device):
    """Each tensor argument of the forward and backward op in turn on the CPU (batch_sizes
    aside, which belongs there): a RuntimeError, not a crash or a silent copy."""
    kw = dict(proj=cell == "lstm", dtype=F32, device=cuda_device)
    for op, args in ((forward_op(cell), op_args(cell, requires_grad=False, **kw)),
                     (backward_op(cell), backward_args(cell, **kw))):
        names = [a.name for a in op._schema.arguments]
        op(*args)  # valid as they are
        for i, value in enumerate(args):
            if not isinstance(value, torch.Tensor) or names[i] == "batch_sizes":
                continue
            bad = list(args)
            bad[i] = value.cpu()
            with pytest.raises(RuntimeError):
                op(*bad)
    torch.cuda.synchronize()  # and nothing was left running that fails later


# ============================================================================ autocast
@pytest.mark.parametrize("cudnn", [pytest.param(True, id="cudnn"), pytest.param(False, id="no-cudnn")])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cell", CELLS)
def test_autocast_runs_in_the_half_dtype_like_torch(cell, dtype, cudnn, cuda_device):
    """float32 modules under torch.autocast("cuda", dtype): outputs and states in torch.nn's
    dtype and close to torch.nn's values (the CUDA half floor of rnnext.parity.HALF_ALLOWANCE,
    x max(1, max|ref|)); backward gives
    gradients in torch.nn's dtypes (float32 for the float32 parameters, input and states).
    torch.nn meets autocast only through cuDNN's RNN op, which runs in float16 whatever the
    autocast dtype; with cuDNN off it is not cast at all: rnnext must follow both."""
    ref, ours = make_pair(cell, IN, HID, dtype=F32, device=cuda_device, **STACK)
    x, hx = make_inputs(ref, with_hx=True)
    with torch.backends.cudnn.flags(enabled=cudnn, allow_tf32=False):
        expected = run(ref, x, hx, autocast_dtype=dtype)
        got = run(ours, x, hx, autocast_dtype=dtype)
    assert expected["out"].dtype == (F16 if cudnn else F32), "torch.nn's autocast behaviour changed"
    assert set(got) == set(expected)
    for key, value in expected.items():
        if value is None:
            assert got[key] is None, key
            continue
        assert got[key].dtype == value.dtype, f"{key}: {got[key].dtype}, torch.nn gives {value.dtype}"
        if key.startswith("param.") or key.startswith("grad_"):
            assert got[key].dtype == F32, f"{key}: {got[key].dtype}"
    tol = dict(atol=HALF_ALLOWANCE[("cuda", dtype)][1], rtol=0)
    assert_results_close(expected, got, f"{cell} under autocast({dtype})", scale_atol=True, tol=tol)


@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_inference_under_cuda_graph_capture(cell, kwargs, cuda_device):
    """A no-grad forward captured in a CUDA graph and replayed on new input gives the eager
    result bit for bit: the ops neither synchronise with the host nor allocate outside the
    caching allocator inside their loops."""
    _, ours = make_pair(cell, 32, 64, dtype=F32, device=cuda_device, **STACK, **kwargs)
    ours.eval()
    static_x, _ = make_inputs(ours, seq_len=LONG_T, batch=LONG_B, seed=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture, as torch.cuda.graphs asks
            ours(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = ours(static_x)[0]
    new_x, _ = make_inputs(ours, seq_len=LONG_T, batch=LONG_B, seed=4)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = ours(new_x)[0]
    assert not torch.equal(new_x, make_inputs(ours, seq_len=LONG_T, batch=LONG_B, seed=3)[0])
    assert torch.equal(static_out, expected)

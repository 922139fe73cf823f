"""float16 and bfloat16 on every device (the `device` fixture), and torch.autocast on the CPU.

rnnext and torch.nn run in the half dtype and are both measured against torch.nn in float64
on the CPU with the same (rounded) weights and inputs; rnnext's error may be at most
rnnext.parity.half_allowance of torch.nn's (on the CPU: 1.25 x torch.nn's error, or two
units of roundoff). Under CPU autocast rnnext must return torch.nn's dtypes, which depend on
the layer (see modules._cpu_autocast_dtypes), with values as close to the float64 oracle.
CUDA autocast is test_cuda.py's.
"""
from __future__ import annotations

import pytest
import torch

import rnnext
from helpers import (BF16, CELL_KINDS, F16, F32, F64, HALF, MODULE_CONFIGS, OP_CELLS, assert_half_within,
                     backward_args, backward_op, forward_op, half_twins, make_inputs, make_pair, op_args,
                     rounded, run, run_cell, run_packed, to_device)

# torch.backends.mkldnn.flags() also sets oneDNN's TF32 switch, which warns on a CPU build.
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")

IN, HID = 8, 16
STACK = dict(num_layers=2, bidirectional=True)
LENGTHS = [6, 3, 5, 1, 6, 2]  # unsorted: packed with enforce_sorted=False


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_half_precision_parity_packed(cell, kwargs, dtype, device):
    """Two bidirectional layers on an unsorted packed batch with initial states, in float16
    and bfloat16: rnnext and torch.nn in that dtype against torch.nn in float64 on the CPU."""
    ref64, _ = make_pair(cell, IN, HID, dtype=F64, **STACK, **kwargs)
    ref_h, ours_h, oracle = half_twins(ref64, device, dtype)
    x, hx = make_inputs(oracle, with_hx=True, seq_len=max(LENGTHS), batch=len(LENGTHS))
    x, hx = rounded(x, dtype), rounded(hx, dtype)
    expected = run_packed(oracle, x, LENGTHS, hx, False, loss_dtype=dtype)
    x_h, hx_h = to_device(x, device, dtype), to_device(hx, device, dtype)
    torch_res = run_packed(ref_h, x_h, LENGTHS, hx_h, False, loss_dtype=dtype)
    our_res = run_packed(ours_h, x_h, LENGTHS, hx_h, False, loss_dtype=dtype)
    assert_half_within(expected, torch_res, our_res, dtype, device, f"{cell} {kwargs} {dtype}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_half_precision_cells(kind, dtype, device):
    """The *Cell modules in float16 and bfloat16, one step with states, the same criterion."""
    ref64, _ = make_pair(kind, IN, HID, dtype=F64)
    ref_h, ours_h, oracle = half_twins(ref64, device, dtype)
    g = torch.Generator().manual_seed(3)
    x = rounded(torch.randn(len(LENGTHS), IN, generator=g, dtype=F64), dtype)
    h = rounded(0.5 * torch.randn(len(LENGTHS), HID, generator=g, dtype=F64), dtype)
    c = rounded(0.5 * torch.randn(len(LENGTHS), HID, generator=g, dtype=F64), dtype)
    hx = (h, c) if kind == "LSTMCell" else h
    expected = run_cell(oracle, x, hx, loss_dtype=dtype)
    x_h, hx_h = to_device(x, device, dtype), to_device(hx, device, dtype)
    torch_res = run_cell(ref_h, x_h, hx_h, loss_dtype=dtype)
    our_res = run_cell(ours_h, x_h, hx_h, loss_dtype=dtype)
    assert_half_within(expected, torch_res, our_res, dtype, device, f"{kind} {dtype}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_half_precision_parity_padded(cell, kwargs, dtype, device):
    """Two bidirectional layers, batch_first, padded, default initial states; and unbatched."""
    ref64, _ = make_pair(cell, IN, HID, dtype=F64, batch_first=True, **STACK, **kwargs)
    ref_h, ours_h, oracle = half_twins(ref64, device, dtype)
    for batched in (True, False):
        x, _ = make_inputs(oracle, batched=batched)
        x = rounded(x, dtype)
        expected = run(oracle, x, loss_dtype=dtype)
        x_h = to_device(x, device, dtype)
        torch_res = run(ref_h, x_h, loss_dtype=dtype)
        our_res = run(ours_h, x_h, loss_dtype=dtype)
        assert_half_within(expected, torch_res, our_res, dtype, device, f"{cell} {kwargs} {dtype} {batched=}")


# ============================================================================ raw-op flags in the half dtypes
MASKS = [(False, True), (True, False), (False, False)]
OP_CASES = [pytest.param(c, False, id=c) for c in OP_CELLS] + [pytest.param("lstm", True, id="lstm-proj")]


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), *HALF])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell,proj", OP_CASES)
def test_op_flags(cell, proj, packed, dtype, device):
    """need_backward=False: the training forward's bits and an empty [0, cols] workspace.
    need_grad_x / need_grad_weights False: those gradients [0], the rest the full call's bits.
    (float64: test_gradcheck.py and test_inference_path.py.)"""
    kw = dict(proj=proj, dtype=dtype, device=device, batch_sizes=[3, 3, 2, 1] if packed else None,
              steps=4, batch=3, input_size=IN, hidden_size=HID, proj_size=6)
    args = op_args(cell, requires_grad=False, **kw)
    train = forward_op(cell)(*args, True)
    infer = forward_op(cell)(*args, False)
    for t, i in zip(train[:-1], infer[:-1]):
        assert t.dtype == dtype and t.device.type == device
        assert torch.equal(t, i)
    rows = args[0].reshape(-1, args[0].shape[-1]).shape[0]
    assert train[-1].shape[0] == rows
    assert infer[-1].shape == (0, train[-1].shape[1])

    bargs = backward_args(cell, **kw)
    full = backward_op(cell)(*bargs)
    assert all(g.dtype == dtype and g.device.type == device for g in full)
    assert full[0].shape == args[0].shape
    n_states = 2 if cell == "lstm" else 1
    for need_x, need_w in MASKS:
        masked = backward_op(cell)(*bargs, need_x, need_w)
        for i, (f, m) in enumerate(zip(full, masked)):
            wanted = need_x if i == 0 else (True if i <= n_states else need_w)
            if wanted:
                assert torch.equal(f, m), (need_x, need_w, i)
            else:
                assert m.shape == (0,), (need_x, need_w, i)




# ============================================================================ CPU autocast
def _assert_like_torch_under_autocast(expected32, torch_res, our_res, dtype, what):
    """Every result in torch.nn's dtype (the parameters' gradients float32), rnnext's error
    against the float32 run without autocast within half_allowance of torch.nn's."""
    assert_half_within(expected32, torch_res, our_res, dtype, "cpu", what)
    for key, value in our_res.items():
        if key.startswith("param."):
            assert value.dtype == F32, f"{what}: {key} is {value.dtype}"


def _raises(fn):
    try:
        return fn(), None
    except RuntimeError as e:  # oneDNN's float16 LSTM is missing on CPUs without AVX512-FP16
        return None, e


@pytest.mark.parametrize("onednn", [pytest.param(True, id="onednn"), pytest.param(False, id="no-onednn")])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zero-state", "with-state"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_cpu_autocast_layers_follow_torch(cell, kwargs, dtype, with_hx, onednn):
    """float32 layers under torch.autocast("cpu", dtype): outputs and states in the dtypes
    torch.nn returns (all `dtype` through oneDNN's LSTM, float32 for a GRU's states, ...), and
    values as close to the float32 run as torch.nn's; gradients float32."""
    ref, ours = make_pair(cell, IN, HID, dtype=F32, **STACK, **kwargs)
    x, hx = make_inputs(ref, with_hx=with_hx)
    with torch.backends.mkldnn.flags(enabled=onednn):
        expected = run(ref, x, hx)
        torch_res, error = _raises(lambda: run(ref, x, hx, autocast_dtype=dtype))
        got = run(ours, x, hx, autocast_dtype=dtype)
    if error is not None:
        # torch.nn fails: rnnext gives what oneDNN's LSTM gives where it exists (all in dtype).
        assert cell == "LSTM" and dtype == F16 and onednn, error
        assert all(got[k].dtype == dtype for k in ("out", "h_n", "c_n")), {k: got[k].dtype for k in got}
        return
    _assert_like_torch_under_autocast(expected, torch_res, got, dtype, f"{cell} {kwargs} {dtype}")


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zero-state", "float32-state"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_cpu_autocast_half_input_follows_torch(cell, kwargs, dtype, with_hx, grad):
    """Input already in the autocast dtype (from an autocast Linear, say) into a float32
    layer: torch.nn's LSTM takes oneDNN only where its checks on that input pass (float16
    only without grad, on CPUs with fp16 support), else its default path, whose dtypes
    follow the state's. Outputs compared in dtype and value."""
    ref, ours = make_pair(cell, IN, HID, dtype=F32, **kwargs)
    x32, hx = make_inputs(ref, with_hx=with_hx)
    x = x32.to(dtype)
    with torch.set_grad_enabled(grad):
        expected = ref(x.float(), hx)
        torch_res, error = _raises(lambda: _autocast_call(ref, x, hx, dtype))
        got = _autocast_call(ours, x, hx, dtype)
    if error is not None:
        assert dtype == F16, error  # oneDNN's float16 LSTM where the CPU lacks it
        return
    names = ("out", "h_n", "c_n")
    flat = lambda out: dict(zip(names, [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]))
    assert_half_within(flat(expected), flat(torch_res), flat(got), dtype, "cpu", f"{cell} {kwargs} {dtype}")


def _autocast_call(module, x, hx, dtype):
    with torch.autocast("cpu", dtype=dtype):
        return module(x, hx)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cell,kwargs", MODULE_CONFIGS)
def test_cpu_autocast_packed_follows_torch(cell, kwargs, dtype):
    """A packed batch under CPU autocast: torch.nn's LSTM takes its default path there."""
    ref, ours = make_pair(cell, IN, HID, dtype=F32, **STACK, **kwargs)
    x, hx = make_inputs(ref, with_hx=True, seq_len=max(LENGTHS), batch=len(LENGTHS))
    expected = run_packed(ref, x, LENGTHS, hx, False)
    torch_res = run_packed(ref, x, LENGTHS, hx, False, autocast_dtype=dtype)
    got = run_packed(ours, x, LENGTHS, hx, False, autocast_dtype=dtype)
    _assert_like_torch_under_autocast(expected, torch_res, got, dtype, f"packed {cell} {kwargs} {dtype}")


@pytest.mark.parametrize("state_dtype", [F32, BF16], ids=["float32-state", "bfloat16-state"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cpu_autocast_cells_follow_torch(kind, state_dtype):
    """The *Cell modules under CPU autocast (bfloat16), with float32 or bfloat16 states: the
    state's dtype decides the GRU's and LSTM's output dtypes in torch.nn."""
    ref, ours = make_pair(kind, IN, HID, dtype=F32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(LENGTHS), IN, generator=g)
    states = [(0.5 * torch.randn(len(LENGTHS), HID, generator=g)).to(state_dtype) for _ in range(2)]
    hx = tuple(states) if kind == "LSTMCell" else states[0]
    hx32 = tuple(t.float() for t in states) if kind == "LSTMCell" else states[0].float()
    expected = run_cell(ref, x, hx32)
    torch_res = run_cell(ref, x, hx, autocast_dtype=BF16)
    got = run_cell(ours, x, hx, autocast_dtype=BF16)
    _assert_like_torch_under_autocast(expected, torch_res, got, BF16, f"{kind} {state_dtype}")


def test_cpu_autocast_leaves_float64_alone():
    ref, ours = make_pair("LSTM", IN, HID, dtype=F64)
    x, _ = make_inputs(ref)
    with torch.autocast("cpu", dtype=BF16):
        y, (h, c) = ours(x)
        y_ref, _ = ref(x)
    assert y.dtype == h.dtype == c.dtype == y_ref.dtype == F64
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cell,proj", OP_CASES)
def test_opcheck_in_half_dtypes(cell, proj, dtype, device):
    """The fake kernels give the real kernels' shapes and dtypes in the half dtypes too (the
    workspace is float32 for them on the CPU: workspace_dtype, csrc/layer_checks.h)."""
    kw = dict(proj=proj, dtype=dtype, device=device, steps=4, batch=3, input_size=IN, hidden_size=HID, proj_size=6)
    fwd = op_args(cell, **kw)
    result = torch.library.opcheck(forward_op(cell), fwd,
                                   test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    assert all(v == "SUCCESS" for v in result.values()), result
    ws = forward_op(cell)(*fwd)[-1]
    expected_ws = F32 if device == "cpu" else dtype
    assert ws.dtype == expected_ws == rnnext._ops.workspace_dtype(fwd[0])
    result = torch.library.opcheck(backward_op(cell), backward_args(cell, **kw),
                                   test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", HALF)
def test_compiled_half_training_matches_eager(dtype, device):
    """torch.compile(fullgraph=True) of a bfloat16/float16 layer: forward and backward as
    eager (the compiled graph runs the same ops, with the fake kernels' dtypes)."""
    _, ours = make_pair("LSTM", IN, HID, dtype=dtype, device=device, **STACK)
    x, _ = make_inputs(ours)
    expected = run(ours, x)
    got = run(torch.compile(ours, fullgraph=True, backend="aot_eager"), x)
    got = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert (got[key] is None) == (value is None), key
        if value is not None:
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key

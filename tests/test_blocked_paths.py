"""Parity at sizes that take the CPU kernels' multi-thread routes, which the small parity
shapes (B=3, H=5) never reach:

* the forward step loop splits the hidden units into one block per thread once a step's
  recurrent product has at least 2^18 multiply-adds (csrc/cpu/layer_loop.h, unit_blocks);
  H=152 splits unevenly (64 + 88 units), so a block's width is not a multiple of the SIMD
  width;
* float32 per-step products run on rnnext's own GEMM (the widest kernel the CPU has: see
  test_cpu_gemm.py for each kernel), each block's weight slice packed once for B rows and
  then called with fewer rows as a packed batch shrinks;
* float64 takes the plain dgemm with the same blocks (a few rows: the small kernel).

torch.nn with the same weights is the oracle; the tests pin two threads so the split happens
on any machine. CPU-only: these are the CPU kernels' routes (forced with rnnext._C.cpu_option).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers import (CELL_KINDS, CELLS, assert_results_close, assert_results_equal, cpu_option, make_inputs,
                     make_pair, require_gemm_route, run, run_cell, run_packed)

SEQ, BATCH, IN, HID = 7, 24, 40, 152
LENGTHS = [7, 3, 5, 7, 1, 6, 2, 4, 7, 5, 3, 6, 1, 2, 7, 4, 5, 6, 3, 2, 7, 1, 4, 6]  # unsorted


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def compare(expected, got, dtype):
    """TOL[dtype] with the absolute part scaled by each tensor's largest magnitude: at these
    sizes a parameter gradient sums ~170 rows of O(1) products and reaches magnitudes of
    10-30, so float32 rounding alone gives absolute differences above 1e-5. Measured max of
    |difference| / max(1, max|expected|) over the bidirectional 2-layer cases: float32 7e-7,
    float64 2e-15."""
    assert got["out"].dtype == dtype
    assert_results_close(expected, got, scale_atol=True)


DTYPES = (torch.float32, torch.float64)
PADDED = list(itertools.product(CELLS, DTYPES, (False, True)))


@pytest.mark.parametrize("cell,dtype,bidirectional", PADDED,
                         ids=[f"{c}-{str(d)[6:]}-{'bi' if b else 'uni'}" for c, d, b in PADDED])
def test_padded_two_layers(cell, dtype, bidirectional):
    ref, ours = make_pair(cell, IN, HID, dtype=dtype, num_layers=2, bidirectional=bidirectional)
    x, hx = make_inputs(ref, with_hx=True, seq_len=SEQ, batch=BATCH)
    compare(run(ref, x, hx), run(ours, x, hx), dtype)


PACKED = list(itertools.product(CELLS, DTYPES))


@pytest.mark.parametrize("cell,dtype", PACKED, ids=[f"{c}-{str(d)[6:]}" for c, d in PACKED])
def test_packed_bidirectional(cell, dtype):
    """Rows drop out as sequences end (forward) and join as they begin (reverse)."""
    ref, ours = make_pair(cell, IN, HID, dtype=dtype, bidirectional=True)
    x, hx = make_inputs(ref, with_hx=True, seq_len=SEQ, batch=BATCH)
    compare(run_packed(ref, x, LENGTHS, hx, False), run_packed(ours, x, LENGTHS, hx, False), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_lstm_projection(dtype):
    ref, ours = make_pair("LSTM", IN, HID, dtype=dtype, proj_size=48, num_layers=2)
    x, hx = make_inputs(ref, with_hx=True, seq_len=SEQ, batch=BATCH)
    compare(run(ref, x, hx), run(ours, x, hx), dtype)


@pytest.mark.parametrize("cell", CELLS)
def test_inference_matches_training_forward(cell):
    """The no-grad path (no workspace) gives the same output bits as the training forward."""
    _, ours = make_pair(cell, IN, HID, dtype=torch.float32)
    x, _ = make_inputs(ours, seq_len=SEQ, batch=BATCH)
    y_train, _ = ours(x)
    with torch.no_grad():
        y_infer, _ = ours(x)
    assert torch.equal(y_train.detach(), y_infer)


CHUNKED = list(itertools.product(CELLS, DTYPES, (1, 50)))


@pytest.mark.parametrize("cell,dtype,chunk_rows", CHUNKED,
                         ids=[f"{c}-{str(d)[6:]}-rows{r}" for c, d, r in CHUNKED])
def test_input_projection_in_chunks(cell, dtype, chunk_rows):
    """The forward computes gi = x @ W_ih^T a chunk of whole steps at a time (about 4 MiB of gi
    per chunk, so the small shapes above fit in one). The chunk_rows option puts the chunk edges
    at every step (1) or every second step (50 rows, B=24), in both directions, padded and
    packed with rows dropping out and joining across chunk edges."""
    ref, ours = make_pair(cell, IN, HID, dtype=dtype, num_layers=2, bidirectional=True)
    x, hx = make_inputs(ref, with_hx=True, seq_len=SEQ, batch=BATCH)
    with cpu_option("chunk_rows", str(chunk_rows)):
        compare(run(ref, x, hx), run(ours, x, hx), dtype)
        compare(run_packed(ref, x, LENGTHS, hx, False), run_packed(ours, x, LENGTHS, hx, False), dtype)


# Hidden sizes whose W_hh share per thread exceeds 768 KiB in float32, so the forward cuts
# the units into 8 blocks per thread taken in turn (unit_blocks, take_blocks); none is a
# multiple of 16, so the last block and the GEMM's last column strip are partial, and
# K = H > 256 spans two of the GEMM's depth blocks.
LARGE_HIDDEN = {"LSTM": 330, "GRU": 370, "RNN_TANH": 650, "RNN_RELU": 650}
SHARED = list(itertools.product(CELLS, DTYPES))


@pytest.mark.parametrize("cell,dtype", SHARED, ids=[f"{c}-{str(d)[6:]}" for c, d in SHARED])
def test_blocks_taken_in_turn(cell, dtype):
    ref, ours = make_pair(cell, 24, LARGE_HIDDEN[cell], dtype=dtype)
    x, hx = make_inputs(ref, with_hx=True, seq_len=4, batch=8)
    compare(run(ref, x, hx), run(ours, x, hx), dtype)


# From 32 rows per step the forward computes each unit block's slice of the input
# projection per step, next to its recurrent product (fuse_input_product), instead of a
# chunk of steps at a time. 35 rows: five 6-row GEMM blocks and a 5-row remainder.
FUSED_BATCH = 35
FUSED_LENGTHS = [(7 * i) % 6 + 1 for i in range(FUSED_BATCH)]


@pytest.mark.parametrize("cell,dtype", SHARED, ids=[f"{c}-{str(d)[6:]}" for c, d in SHARED])
def test_input_product_per_step(cell, dtype):
    ref, ours = make_pair(cell, IN, HID, dtype=dtype, num_layers=2, bidirectional=True)
    x, hx = make_inputs(ref, with_hx=True, seq_len=6, batch=FUSED_BATCH)
    compare(run(ref, x, hx), run(ours, x, hx), dtype)
    compare(run_packed(ref, x, FUSED_LENGTHS, hx, False), run_packed(ours, x, FUSED_LENGTHS, hx, False), dtype)


@pytest.mark.parametrize("cell", CELLS)
def test_input_product_per_step_blocks_taken_in_turn(cell):
    ref, ours = make_pair(cell, 24, LARGE_HIDDEN[cell], dtype=torch.float32)
    x, hx = make_inputs(ref, with_hx=True, seq_len=3, batch=FUSED_BATCH)
    compare(run(ref, x, hx), run(ours, x, hx), torch.float32)


# W_ih and W_hh of 16 MiB or more together (here 1 + 16 MiB): the AVX-512 kernel projects
# the input per chunk of steps even at 35 rows, the AVX2 kernel per step and unit block
# (layer_loop.h, fuse_input_product). Each route this CPU has, against torch.nn.
@pytest.mark.parametrize("route", ("avx512", "avx2"))
def test_large_weights_input_product_per_kernel(route):
    require_gemm_route(route)
    ref, ours = make_pair("LSTM", 64, 1024, dtype=torch.float32, seed=3)
    x, hx = make_inputs(ref, with_hx=True, seq_len=6, batch=FUSED_BATCH)
    assert (ref.weight_ih_l0.numel() + ref.weight_hh_l0.numel()) * 4 >= 16 << 20
    with cpu_option("own_gemm", route):
        got = run(ours, x, hx)
        got_packed = run_packed(ours, x, FUSED_LENGTHS, hx, False)
    compare(run(ref, x, hx), got, torch.float32)
    compare(run_packed(ref, x, FUSED_LENGTHS, hx, False), got_packed, torch.float32)


STREAMED = list(itertools.product(CELLS, (8, FUSED_BATCH)))


@pytest.mark.parametrize("cell,batch", STREAMED, ids=[f"{c}-B{b}" for c, b in STREAMED])
def test_streamed_weight_prefetch(cell, batch):
    """Forward steps whose weights exceed the streaming_bytes option (16 MiB) prefetch, with the
    AVX2 kernel, the next weight strip spread over the row blocks (packed_gemm::strip_rows).
    streaming_bytes=0 takes that route at these small sizes, unfused (8 rows) and fused (35),
    with every row count the 6-row blocks leave. Prefetches change no arithmetic: the bits
    equal the default route's, and torch.nn is matched. (The AVX-512 kernel has no such
    route; the AVX2 one is forced, and skipped only where the CPU lacks AVX2.)"""
    require_gemm_route("avx2")
    ref, ours = make_pair(cell, 24, LARGE_HIDDEN[cell], dtype=torch.float32)
    x, hx = make_inputs(ref, with_hx=True, seq_len=3, batch=batch)
    with cpu_option("own_gemm", "avx2"):
        default = run(ours, x, hx)
        with cpu_option("streaming_bytes", "0"):
            streamed = run(ours, x, hx)
    compare(run(ref, x, hx), streamed, torch.float32)
    assert_results_equal(default, streamed, what="streamed weights")


# One or two steps per call: with one unit block, the first step's recurrent product runs
# beside the input projection, one per thread (layer_loop.h, overlap_first_step), once each
# has 2^16 multiply-adds; at B=24, I=40, H=152 every cell's do (RNN: 24 x 152 x 40 = 146K).
SHORT = list(itertools.product(CELLS, DTYPES, (1, 2)))


@pytest.mark.parametrize("cell,dtype,seq_len", SHORT, ids=[f"{c}-{str(d)[6:]}-T{t}" for c, d, t in SHORT])
def test_short_sequences_first_step_beside_input_projection(cell, dtype, seq_len):
    """Two bidirectional layers (the reverse direction starts from its last step), padded
    and packed (in reverse, rows that begin later join from h0), without and with hx."""
    ref, ours = make_pair(cell, IN, HID, dtype=dtype, num_layers=2, bidirectional=True)
    for with_hx in (False, True):
        x, hx = make_inputs(ref, with_hx=with_hx, seq_len=seq_len, batch=BATCH)
        compare(run(ref, x, hx), run(ours, x, hx), dtype)
    lengths = [seq_len - i % seq_len for i in range(BATCH)]
    compare(run_packed(ref, x, lengths, hx, False), run_packed(ours, x, lengths, hx, False), dtype)


CELL_DTYPES = list(itertools.product(CELL_KINDS, DTYPES))


@pytest.mark.parametrize("kind,dtype", CELL_DTYPES, ids=[f"{k}-{str(d)[6:]}" for k, d in CELL_DTYPES])
def test_cells_first_step_beside_input_projection(kind, dtype):
    ref, ours = make_pair(kind, IN, HID, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(BATCH, IN, generator=g, dtype=dtype)
    h = 0.5 * torch.randn(BATCH, HID, generator=g, dtype=dtype)
    hx = (h, 0.5 * torch.randn(BATCH, HID, generator=g, dtype=dtype)) if kind == "LSTMCell" else h
    for state in (None, hx):
        assert_results_close(run_cell(ref, x, state), run_cell(ours, x, state), kind, scale_atol=True)

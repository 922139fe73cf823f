"""PackedSequence input: a few parity checks against torch.nn (outputs, final states and all
gradients), sorted and unsorted batches, with and without initial states, on the CPU and on
CUDA (batch_sizes stays a CPU tensor on both, as torch makes it). The full packed suite
belongs to a later task."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from helpers import (CELLS, assert_results_close, forward_op, make_inputs, make_pair, op_args, run_packed,
                     tolerance)

F64 = torch.float64
LENGTHS = {True: [5, 4, 2, 1], False: [2, 5, 1, 4]}  # enforce_sorted -> lengths


CASES = list(itertools.product(CELLS, (1, 2), (False, True), (False, True), (True, False)))


@pytest.mark.parametrize("cell,layers,bidirectional,with_hx,enforce_sorted", CASES,
                         ids=[f"{c}-L{l}-{'bi' if bi else 'uni'}-{'hx' if h else 'nohx'}-"
                              f"{'sorted' if s else 'unsorted'}" for c, l, bi, h, s in CASES])
def test_packed_parity(cell, layers, bidirectional, with_hx, enforce_sorted, device):
    ref, ours = make_pair(cell, num_layers=layers, bidirectional=bidirectional, device=device)
    lengths = LENGTHS[enforce_sorted]
    x, hx = make_inputs(ref, with_hx=with_hx, seq_len=max(lengths), batch=len(lengths))
    expected = run_packed(ref, x, lengths, hx, enforce_sorted)
    got = run_packed(ours, x, lengths, hx, enforce_sorted)
    assert all(value is not None for value in expected.values())
    assert_results_close(expected, got, what="packed")


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_parity_lstm_proj_batch_first(bidirectional, enforce_sorted, device):
    ref, ours = make_pair("LSTM", num_layers=2, bidirectional=bidirectional, proj_size=2, batch_first=True,
                          device=device)
    lengths = LENGTHS[enforce_sorted]
    x, hx = make_inputs(ref, with_hx=True, seq_len=max(lengths), batch=len(lengths))
    expected = run_packed(ref, x, lengths, hx, enforce_sorted)
    got = run_packed(ours, x, lengths, hx, enforce_sorted)
    assert_results_close(expected, got, what="packed LSTM proj")


@pytest.mark.parametrize("cell", CELLS)
def test_packed_equal_lengths_equals_padded(cell, device):
    """All sequences full length: the packed result is the padded one."""
    _, ours = make_pair(cell, num_layers=2, bidirectional=True, device=device)
    x, hx = make_inputs(ours, with_hx=True)
    padded_out = ours(x, hx)[0]
    packed = pack_padded_sequence(x, [x.shape[0]] * x.shape[1])
    packed_out = pad_packed_sequence(ours(packed, hx)[0])[0]
    torch.testing.assert_close(packed_out, padded_out, **tolerance(device, F64))


@pytest.mark.parametrize("cell", CELLS)
def test_packed_training_dropout_matches_torch(cell, device):
    """With the same seed the same dropout masks (on CUDA torch.nn's native kernels draw them:
    cuDNN's dropout masks are its own, see helpers.torch_oracle)."""
    ref, ours = make_pair(cell, num_layers=3, bidirectional=True, dropout=0.3, device=device)
    lengths = LENGTHS[False]
    x, hx = make_inputs(ref, with_hx=True, seq_len=max(lengths), batch=len(lengths))
    torch.manual_seed(4)
    expected = run_packed(ref, x, lengths, hx, False)
    torch.manual_seed(4)
    got = run_packed(ours, x, lengths, hx, False)
    assert_results_close(expected, got, what="packed dropout")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
def test_gradcheck_packed_op(cell, reverse, device):
    """The forward op on packed data ([N, I] + batch_sizes on the CPU), checked by finite
    differences; LSTM with a projection."""
    args = op_args(cell, reverse=reverse, proj=cell == "lstm", batch_sizes=[3, 2, 2, 1], device=device)
    assert args[0].shape == (8, 3) and args[0].device.type == torch.device(device).type
    assert args[-2].device.type == "cpu"
    op = forward_op(cell)
    assert torch.autograd.gradcheck(lambda *a: op(*a)[:-1], args, eps=1e-6, atol=1e-8, rtol=1e-6)


LENGTH_SETS = {
    "all-equal": [4, 4, 4],
    "all-length-1": [1, 1, 1],
    "one-long-rest-1": [1, 5, 1, 1],
    "all-different-unsorted": [3, 1, 6, 2, 5],
}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("name", list(LENGTH_SETS))
def test_packed_parity_length_sets(cell, name, device):
    """Edge length patterns, unsorted input, two bidirectional layers, against torch.nn."""
    lengths = LENGTH_SETS[name]
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True, device=device)
    x, hx = make_inputs(ref, with_hx=True, seq_len=max(lengths), batch=len(lengths))
    expected = run_packed(ref, x, lengths, hx, False)
    got = run_packed(ours, x, lengths, hx, False)
    assert all(value is not None for value in expected.values())
    assert_results_close(expected, got, what=f"packed {name}")

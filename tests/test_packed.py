"""PackedSequence input: a few parity checks against torch.nn (outputs, final states and all
gradients), sorted and unsorted batches, with and without initial states. The full packed
suite belongs to a later task."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from helpers import CELLS, TOL, make_inputs, make_pair, run_packed

F64 = torch.float64
LENGTHS = {True: [5, 4, 2, 1], False: [2, 5, 1, 4]}  # enforce_sorted -> lengths


CASES = list(itertools.product(CELLS, (1, 2), (False, True), (False, True), (True, False)))


@pytest.mark.parametrize("cell,layers,bidirectional,with_hx,enforce_sorted", CASES,
                         ids=[f"{c}-L{l}-{'bi' if bi else 'uni'}-{'hx' if h else 'nohx'}-"
                              f"{'sorted' if s else 'unsorted'}" for c, l, bi, h, s in CASES])
def test_packed_parity(cell, layers, bidirectional, with_hx, enforce_sorted):
    ref, ours = make_pair(cell, num_layers=layers, bidirectional=bidirectional)
    lengths = LENGTHS[enforce_sorted]
    x, hx = make_inputs(ref, with_hx=with_hx, seq_len=max(lengths), batch=len(lengths))
    expected = run_packed(ref, x, lengths, hx, enforce_sorted)
    got = run_packed(ours, x, lengths, hx, enforce_sorted)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] is not None, key
        torch.testing.assert_close(got[key], value, **TOL[F64], msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_parity_lstm_proj_batch_first(bidirectional, enforce_sorted):
    ref, ours = make_pair("LSTM", num_layers=2, bidirectional=bidirectional, proj_size=2, batch_first=True)
    lengths = LENGTHS[enforce_sorted]
    x, hx = make_inputs(ref, with_hx=True, seq_len=max(lengths), batch=len(lengths))
    expected = run_packed(ref, x, lengths, hx, enforce_sorted)
    got = run_packed(ours, x, lengths, hx, enforce_sorted)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, **TOL[F64], msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_packed_equal_lengths_equals_padded(cell):
    """All sequences full length: the packed result is the padded one."""
    _, ours = make_pair(cell, num_layers=2, bidirectional=True)
    x, hx = make_inputs(ours, with_hx=True)
    padded_out = ours(x, hx)[0]
    packed = pack_padded_sequence(x, [x.shape[0]] * x.shape[1])
    packed_out = pad_packed_sequence(ours(packed, hx)[0])[0]
    torch.testing.assert_close(packed_out, padded_out, **TOL[F64])


@pytest.mark.parametrize("cell", CELLS)
def test_packed_training_dropout_matches_torch(cell):
    ref, ours = make_pair(cell, num_layers=3, bidirectional=True, dropout=0.3)
    lengths = LENGTHS[False]
    x, hx = make_inputs(ref, with_hx=True, seq_len=max(lengths), batch=len(lengths))
    torch.manual_seed(4)
    expected = run_packed(ref, x, lengths, hx, False)
    torch.manual_seed(4)
    got = run_packed(ours, x, lengths, hx, False)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, **TOL[F64], msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
def test_gradcheck_packed_op(cell, reverse):
    """The forward op on packed data ([N, I] + batch_sizes), checked by finite differences."""
    gates = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}[cell]
    i, h, p = 3, 4, 2
    batch_sizes = torch.tensor([3, 2, 2, 1], dtype=torch.int64)
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (0.5 * torch.randn(*shape, generator=g, dtype=F64)).requires_grad_(True)

    op = getattr(torch.ops.rnnext, f"{cell}_layer_forward").default
    n = int(batch_sizes.sum())
    if cell == "lstm":
        args = (r(n, i), r(3, p), r(3, h), r(4 * h, i), r(4 * h, p), r(4 * h), r(4 * h), r(p, h),
                batch_sizes, reverse)
    else:
        args = (r(n, i), r(3, h), r(gates * h, i), r(gates * h, h), r(gates * h), r(gates * h),
                batch_sizes, reverse)
    assert torch.autograd.gradcheck(lambda *a: op(*a)[:-1], args, eps=1e-6, atol=1e-8, rtol=1e-6)


LENGTH_SETS = {
    "all-equal": [4, 4, 4],
    "all-length-1": [1, 1, 1],
    "one-long-rest-1": [1, 5, 1, 1],
    "all-different-unsorted": [3, 1, 6, 2, 5],
}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("name", list(LENGTH_SETS))
def test_packed_parity_length_sets(cell, name):
    """Edge length patterns, unsorted input, two bidirectional layers, against torch.nn."""
    lengths = LENGTH_SETS[name]
    ref, ours = make_pair(cell, num_layers=2, bidirectional=True)
    x, hx = make_inputs(ref, with_hx=True, seq_len=max(lengths), batch=len(lengths))
    expected = run_packed(ref, x, lengths, hx, False)
    got = run_packed(ours, x, lengths, hx, False)
    for key, value in expected.items():
        assert got[key] is not None, key
        torch.testing.assert_close(got[key], value, **TOL[F64], msg=lambda m: f"{key}: {m}")

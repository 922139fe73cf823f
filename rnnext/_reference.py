"""A plain torch-op implementation of one layer in one direction, with the same signature and
sequence layout as the C++ ops. It is differentiable to any order, so the autograd formula in
_ops.py uses it when a graph of the gradient is requested (create_graph=True). It is slow and
never on the normal path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _cell_step(cell, gi, gh, h_prev, c_prev):
    """One step on [rows, G*H] pre-activations; returns (h, c) with c None outside LSTM."""
    if cell == "rnn_tanh":
        return torch.tanh(gi + gh), None
    if cell == "rnn_relu":
        return torch.relu(gi + gh), None
    if cell == "gru":
        gi_r, gi_z, gi_n = gi.chunk(3, 1)
        gh_r, gh_z, gh_n = gh.chunk(3, 1)
        r = torch.sigmoid(gi_r + gh_r)
        z = torch.sigmoid(gi_z + gh_z)
        n = torch.tanh(gi_n + r * gh_n)
        return (1 - z) * n + z * h_prev, None
    i, f, g, o = (gi + gh).chunk(4, 1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def layer(cell, x, h0, c0, w, batch_sizes, reverse):
    """x [T, B, I], one step [B, I], or packed [N, I] + batch_sizes; returns (y, h_n, c_n)."""
    one_step = batch_sizes is None and x.dim() == 2
    if one_step:
        x = x.unsqueeze(0)
    if batch_sizes is None:
        steps, batch = x.shape[0], x.shape[1]
        rows = [batch] * steps
        data = x.reshape(steps * batch, x.shape[-1])
    else:
        rows = [int(r) for r in batch_sizes]
        data = x
    offsets = [0]
    for r in rows[:-1]:
        offsets.append(offsets[-1] + r)
    gi_all = F.linear(data, w.w_ih, w.b_ih)
    h, c = h0, c0
    outputs = [None] * len(rows)
    order = range(len(rows) - 1, -1, -1) if reverse else range(len(rows))
    for t in order:
        n, off = rows[t], offsets[t]
        h_prev = h[:n]
        c_prev = c[:n] if c is not None else None
        h_new, c_new = _cell_step(cell, gi_all[off:off + n], F.linear(h_prev, w.w_hh, w.b_hh), h_prev, c_prev)
        if w.w_hr is not None:
            h_new = F.linear(h_new, w.w_hr)
        outputs[t] = h_new
        h = torch.cat([h_new, h[n:]])
        if c is not None:
            c = torch.cat([c_new, c[n:]])
    y = torch.cat(outputs)
    if batch_sizes is None and not one_step:
        y = y.view(len(rows), rows[0], -1)
    return y, h, c

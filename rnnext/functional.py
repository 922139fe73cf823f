"""Stacking layers and directions over the one-layer ops: the layer loop written once for
every cell type. Inputs here are already time-major ([T, B, I]) or packed data ([N, I] with
batch_sizes), with states [num_layers * num_directions, B, *].
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import LayerWeights, layer_forward


def rnn_stack(cell: str, x: Tensor, batch_sizes: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
              weights: Sequence[LayerWeights], num_layers: int, bidirectional: bool,
              dropout: float, training: bool):
    """Runs num_layers x num_directions layer ops.

    weights[layer * num_directions + direction]; direction 1 runs the sequence reversed. Each
    layer's input is the concatenation of the previous layer's directions, with dropout
    between layers (not after the last one) when training, as torch.nn does.
    Returns (output, h_n, c_n), c_n None unless cell == "lstm". Computes in the dtype of its
    arguments (CUDA autocast casts them per layer, as cuDNN's RNN op does; CPU autocast, whose
    output dtypes depend on the module torch.nn would run, is the modules' business).
    """
    num_directions = 2 if bidirectional else 1
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            k = layer * num_directions + direction
            y, h, c = layer_forward(cell, layer_input, h0[k], None if c0 is None else c0[k],
                                    weights[k], batch_sizes, reverse=direction == 1)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, -1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, _stack(h_n), (_stack(c_n) if c0 is not None else None)


def _stack(states):
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)

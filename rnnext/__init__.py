"""rnnext: hand-written RNN, LSTM and GRU kernels for PyTorch, drop-in for torch.nn.

    import rnnext
    lstm = rnnext.LSTM(32, 64, num_layers=2, batch_first=True)
    out, (h_n, c_n) = lstm(x)
"""
from . import _ops  # noqa: F401  (loads rnnext._C and registers fake kernels and autograd)
from .functional import rnn_stack
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNBase, RNNCell, RNNCellBase
from .utils import convert, copy_parameters, from_torch, is_recurrent, to_torch


def empty_cache() -> int:
    """Releases the memory rnnext's CPU ops keep between calls: each calling thread's scratch
    buffer (up to 32 MiB per thread, 128 MiB in all) and the pool of freed training buffers
    and packed weights (blocks of 4 MiB or more, up to 512 MiB); returns the bytes released.
    Later calls allocate them again as needed."""
    return _ops._C.empty_cache()


__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "RNNBase", "RNNCellBase", "copy_parameters", "from_torch", "convert", "to_torch", "is_recurrent", "rnn_stack", "empty_cache"]

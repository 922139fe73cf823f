"""Fixtures shared by every test file.

* ``device``: a test that takes it runs once on the CPU and once on CUDA (ids ``cpu`` and
  ``cuda``); the CUDA run skips with "no CUDA device" on a machine without one.
* ``cuda_device``: for CUDA-only tests; skips the same way.
* Every test runs with TF32 off in cuDNN and cuBLAS (restored afterwards), so that torch.nn,
  the oracle, computes float32 on CUDA in full float32.
"""
from __future__ import annotations

import pytest
import torch

from rnnext.parity import strict_fp32

NO_CUDA = "no CUDA device"


def _skip_without_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)


@pytest.fixture(params=["cpu", "cuda"], ids=["cpu", "cuda"])
def device(request) -> str:
    if request.param == "cuda":
        _skip_without_cuda()
    return request.param


@pytest.fixture
def cuda_device() -> str:
    _skip_without_cuda()
    return "cuda"


@pytest.fixture(autouse=True)
def _full_fp32_on_cuda():
    """torch.nn's CUDA results are the oracle: no TF32 in cuDNN's RNN or in cuBLAS GEMMs
    (the same switch as `python -m rnnext check --device cuda`)."""
    with strict_fp32("cuda"):
        yield

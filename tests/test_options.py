"""The CPU tuning options (csrc/cpu/options.h): each environment variable is read once, at
import, and a malformed value is a ValueError naming it; rnnext._C.cpu_option reads and sets
them with the same validation; defaults are what the README documents."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import cpu_option
from rnnext import _C

DEFAULTS = {"mkl_packed": "1", "onednn": "1", "streaming_bytes": str(16 << 20), "chunk_rows": "auto", "bf16_gemm": "1"}
VARIABLES = {"own_gemm": "RNNEXT_OWN_GEMM", "mkl_packed": "RNNEXT_MKL_PACKED", "onednn": "RNNEXT_ONEDNN",
             "streaming_bytes": "RNNEXT_STREAMING_BYTES", "chunk_rows": "RNNEXT_CHUNK_ROWS",
             "bf16_gemm": "RNNEXT_BF16_GEMM"}


def _import_with(**env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in VARIABLES.values()}
    code = "import rnnext; print(sorted(rnnext._C.cpu_option().items()))"
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def test_defaults():
    done = _import_with()
    assert done.returncode == 0, done.stderr
    options = dict(eval(done.stdout))  # noqa: S307 - our own printed dict items
    assert set(options) == set(VARIABLES)
    assert {k: options[k] for k in DEFAULTS} == DEFAULTS
    assert options["own_gemm"] in ("avx512", "avx2", "blas")


def test_variables_are_read_at_import():
    done = _import_with(RNNEXT_OWN_GEMM="blas", RNNEXT_MKL_PACKED="0", RNNEXT_ONEDNN="0",
                        RNNEXT_STREAMING_BYTES="1024", RNNEXT_CHUNK_ROWS="50", RNNEXT_BF16_GEMM="0")
    assert done.returncode == 0, done.stderr
    assert dict(eval(done.stdout)) == {"own_gemm": "blas", "mkl_packed": "0", "onednn": "0",  # noqa: S307
                                       "streaming_bytes": "1024", "chunk_rows": "50", "bf16_gemm": "0"}


MALFORMED = [("RNNEXT_OWN_GEMM", "fastest"), ("RNNEXT_OWN_GEMM", ""), ("RNNEXT_MKL_PACKED", "no"), ("RNNEXT_ONEDNN", "true"),
             ("RNNEXT_STREAMING_BYTES", "16M"), ("RNNEXT_STREAMING_BYTES", "-1"), ("RNNEXT_STREAMING_BYTES", ""),
             ("RNNEXT_CHUNK_ROWS", "0"), ("RNNEXT_CHUNK_ROWS", "1e3"), ("RNNEXT_CHUNK_ROWS", " 5"),
             ("RNNEXT_BF16_GEMM", "yes")]


@pytest.mark.parametrize("variable,value", MALFORMED, ids=[f"{v}={x!r}" for v, x in MALFORMED])
def test_malformed_variable_is_a_value_error_at_import(variable, value):
    done = _import_with(**{variable: value})
    assert done.returncode != 0
    assert "ValueError" in done.stderr and f"{variable}='{value}'" in done.stderr, done.stderr[-2000:]


def test_set_and_restore():
    with cpu_option("chunk_rows", "7"):
        assert _C.cpu_option("chunk_rows") == "7"
        with cpu_option("chunk_rows", "auto"):
            assert _C.cpu_option("chunk_rows") == "auto"
        assert _C.cpu_option("chunk_rows") == "7"
    assert _C.cpu_option("chunk_rows") == "auto"


@pytest.mark.parametrize("name,value", [("chunk_rows", "0"), ("streaming_bytes", "x"), ("onednn", "2"),
                                        ("own_gemm", "sse"), ("bf16_gemm", "on")])
def test_set_rejects_malformed_values(name, value):
    before = _C.cpu_option(name)
    with pytest.raises(ValueError, match=f"cpu_option {name}='{value}'"):
        _C.cpu_option(name, value)
    assert _C.cpu_option(name) == before


def test_unknown_option():
    with pytest.raises(ValueError, match="no CPU option 'threads'"):
        _C.cpu_option("threads")

"""The command line, `python -m rnnext`: help without a command, --version, the bench's row
list that --only filters, and a quick parity check end to end."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rnnext
from rnnext import __main__ as cli
from rnnext import bench


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnext", *argv], capture_output=True, text=True, timeout=300)


def test_no_command_prints_the_help():
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m rnnext" in proc.stdout
    for command in ("check", "bench", "--version"):
        assert command in proc.stdout
    assert "``" not in proc.stdout, "raw reStructuredText backticks in the help"


def test_version():
    proc = _run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"rnnext {rnnext.__version__} (torch {torch.__version__})"


@pytest.mark.parametrize("suite,rows", [
    ("sequence", lambda: bench.default_rows("cpu")),
    ("step", bench.step_rows),
    ("all", lambda: bench.default_rows("cpu") + bench.step_rows()),
])
def test_bench_lists_its_rows(suite, rows, capsys):
    assert cli.main(["bench", "--list", "--suite", suite]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [r.name() for r in rows()]
    assert len(listed) == len(set(listed)), "row names must be unique for --only"


def test_bench_help_points_to_the_list():
    proc = _run("bench", "--help")
    assert proc.returncode == 0
    assert "--list" in proc.stdout and "--only" in proc.stdout
    assert "``" not in proc.stdout


def test_bench_list_honours_only(capsys):
    assert cli.main(["bench", "--list", "--only", "GRUCell"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed and all("GRUCell" in name for name in listed)


def test_quick_check_passes(capsys):
    assert cli.main(["check", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "PASS: all" in out and "FAIL" not in out.replace("FAIL:", "")

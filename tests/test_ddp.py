"""rnnext modules under DistributedDataParallel (gloo, two processes on this machine):
gradients equal those of a single-process run over the same data."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ddp_worker.py"), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]

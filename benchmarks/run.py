"""Runs the rnnext-vs-torch.nn speed suite (rnnext/bench.py) and writes
benchmarks/results.json and benchmarks/results.md (the README's table).

    python benchmarks/run.py [--repeats 7] [--only LSTM ...]
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    json_path = os.path.join(HERE, "results.json")
    cmd = [sys.executable, "-m", "rnnext", "bench", "--json", json_path] + sys.argv[1:]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    table = proc.stdout[proc.stdout.find("| shape"):]
    table = "\n".join(line for line in table.splitlines() if not line.startswith("wrote ")) + "\n"
    header = proc.stdout.splitlines()[0]
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(header + "\n\n" + table)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

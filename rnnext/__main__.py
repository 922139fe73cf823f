"""Command line: ``python -m rnnext check`` (parity report against torch.nn) and
``python -m rnnext bench`` (speed report against torch.nn)."""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def check(args) -> int:
    import warnings

    from . import parity

    # torch.nn's own notice that oneDNN lacks LSTM projections is noise in this report.
    warnings.filterwarnings("ignore", message="LSTM with projections is not supported")

    configs = parity.default_configs()
    if args.quick:
        configs = [c for c in configs if c.dtype == torch.float64]
    print(f"rnnext parity check against torch.nn — {_machine()}")
    print("Scaled max difference |ours - torch.nn| / max(1, |torch.nn|) over output, final states and")
    print("the gradients of input, initial states and every parameter; tolerance: "
          + ", ".join(f"{str(d).replace('torch.', '')} {t:.0e}" for d, t in parity.TOLERANCE.items()))
    print()
    header = f"{'cell':<9} {'dtype':<8} {'configuration':<50} {'max diff':>9} {'worst in':<26} result"
    print(header)
    print("-" * len(header))
    failures = 0
    start = time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        res = parity.compare(cfg)
        worst_key = max(res.errors, key=res.errors.get)
        verdict = "PASS" if res.passed else "FAIL"
        failures += not res.passed
        print(f"{cfg.mode:<9} {str(cfg.dtype).replace('torch.', ''):<8} {cfg.describe():<50} "
              f"{res.worst:>9.1e} {worst_key:<26} {verdict}   [{i}/{len(configs)}]", flush=True)
    print("-" * len(header))
    took = time.perf_counter() - start
    if failures:
        print(f"FAIL: {failures} of {len(configs)} configurations out of tolerance ({took:.1f} s)")
        return 1
    print(f"PASS: all {len(configs)} configurations within tolerance ({took:.1f} s)")
    return 0


def bench(args) -> int:
    import json
    import warnings

    from . import bench as b

    warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
    rows = b.default_rows()
    if args.only:
        rows = [r for r in rows if any(key.lower() in r.name().lower() for key in args.only)]
    machine = _machine()
    print(f"rnnext vs torch.nn speed — {machine}")
    print(f"median of {args.repeats} interleaved repeats; fwd = inference (no grad), "
          "train = forward + backward\n", flush=True)
    results = b.run(rows, repeats=args.repeats, progress=lambda s: print(s, flush=True))
    print()
    print(b.table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(b.to_json(results, machine), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnnext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="parity report against torch.nn (exit 1 on any FAIL)")
    p_check.add_argument("--quick", action="store_true", help="float64 configurations only")
    p_check.set_defaults(func=check)
    p_bench = sub.add_parser("bench", help="speed report against torch.nn")
    p_bench.add_argument("--repeats", type=int, default=7, help="interleaved repeats per row (median)")
    p_bench.add_argument("--only", nargs="*", help="run rows whose name contains any of these")
    p_bench.add_argument("--json", help="also write the results to this JSON file")
    p_bench.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

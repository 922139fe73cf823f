"""Command line: `python -m rnnext check` (parity report against torch.nn) and
`python -m rnnext bench` (speed report against torch.nn), on the CPU or, with
`--device cuda`, on a CUDA device."""
from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Optional

import torch


def _machine() -> str:
    """The CPU: model (with family/model numbers, which tell AMD generations apart), its SIMD
    class, the per-step GEMM kernel rnnext runs, threads and torch."""
    cpu = platform.processor() or platform.machine()
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's fields are enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    cpu = info.get("model name", cpu)
    if "cpu family" in info and "model" in info:
        cpu += f" (family {info['cpu family']} model {info['model']})"
    flags = set(info.get("flags", "").split())
    simd = ("AVX-512" + (" + AVX512-BF16" if "avx512_bf16" in flags else "") if "avx512f" in flags
            else "AVX2" if "avx2" in flags else None)
    from . import _C
    parts = [cpu] + ([simd] if simd else []) + [f"per-step GEMM {_C.cpu_option('own_gemm')}"]
    return f"{', '.join(parts)}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# ---------------------------------------------------------------- devices
def _device_arg(text: str) -> torch.device:
    """argparse type of --device: "cpu", "cuda" or "cuda:N"."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (expected cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (expected cpu, cuda or cuda:N)")
    return device


def _unavailable(device: torch.device) -> Optional[str]:
    """Why `device` cannot be used here, or None."""
    if device.type != "cuda":
        return None
    if torch.version.cuda is None:
        return f"this torch build has no CUDA support (torch {torch.__version__})"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU "
                "(torch.cuda.is_available() is False: no GPU visible, or a driver problem)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"{device} was asked for, but {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def _require(device: torch.device) -> bool:
    """False (after printing why to stderr) when `device` cannot be used here."""
    why = _unavailable(device)
    if why is not None:
        print(f"no CUDA device: {why}", file=sys.stderr)
        return False
    return True


def _cudnn_version() -> str:
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if not v:
        return "none"
    # CUDNN_VERSION: major*1000 + minor*100 + patch up to cuDNN 8, major*10000 + minor*100 + patch from 9.
    major, rest = (v // 10000, v % 10000) if v >= 90000 else (v // 1000, v % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _describe(device: torch.device) -> str:
    """The header's machine: the CPU (model, threads, torch), or the GPU with the torch, CUDA
    and cuDNN versions."""
    if device.type == "cpu":
        return _machine()
    return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, cuDNN {_cudnn_version()}")


def _device_fields(device: torch.device) -> dict:
    """Device fields of the JSON report (none on the CPU, whose fields stay as they were)."""
    if device.type == "cpu":
        return {}
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
            "cudnn": _cudnn_version(), "torch_nn": "cuDNN defaults",
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- check
def check(args) -> int:
    import warnings

    from . import parity

    device = args.device
    if not _require(device):
        return 2
    # torch.nn's own notice that oneDNN lacks LSTM projections is noise in this report.
    warnings.filterwarnings("ignore", message="LSTM with projections is not supported")

    configs = parity.default_configs(device)
    if args.quick:
        configs = [c for c in configs if c.dtype == torch.float64]
    halves = sorted({c.dtype for c in configs if c.dtype in parity.HALF_DTYPES}, key=parity.HALF_DTYPES.index)
    print(f"rnnext parity check against torch.nn — {_describe(device)}")
    print("Scaled max difference |ours - torch.nn| / max(1, |torch.nn|) over output, final states and")
    print("the gradients of input, initial states and every parameter; tolerance: "
          + ", ".join(f"{_dtype_name(d)} {t:.0e}" for (kind, d), t in parity.TOLERANCE.items()
                      if kind == device.type))
    if device.type == "cuda":
        print("(torch.nn on the same GPU, TF32 off in cuDNN and cuBLAS during the check)")
    if halves:
        where = "on the GPU" if device.type == "cuda" else "on the CPU"
        print(f"{' and '.join(_dtype_name(d) for d in halves)}: ours and torch.nn in that dtype {where}, "
              "each against a float64 oracle")
        bounds = []
        for d in halves:
            factor, floor = parity.HALF_ALLOWANCE[(device.type, d)]
            bounds.append(f"{_dtype_name(d)} max({factor:g} x torch.nn's, {floor:.0e})")
        print("(torch.nn in float64 on the CPU, same weights and inputs); pass if ours <= " + ", ".join(bounds))
    print()
    # One value fits 9 characters; a half row shows "ours 3.1e-03 / torch.nn 2.9e-03".
    width = 31 if halves else 9
    header = f"{'cell':<9} {'dtype':<8} {'configuration':<50} {'max diff':>{width}} {'worst in':<26} result"
    print(header)
    print("-" * len(header))
    failures = errored = 0
    start = time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        row = f"{cfg.mode:<9} {_dtype_name(cfg.dtype):<8} {cfg.describe():<50} "
        try:
            res = parity.compare(cfg, device=device)
        except Exception as e:  # one broken configuration is reported, the others still run
            failures += 1
            errored += 1
            message = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"{row}{'-':>{width}} {'':<26} ERROR  [{i}/{len(configs)}]\n    {type(e).__name__}: {message}",
                  flush=True)
            continue
        worst_key = max(res.errors, key=res.errors.get)
        verdict = "PASS" if res.passed else "FAIL"
        failures += not res.passed
        diff = f"{res.worst:.1e}" if res.ref_errors is None else \
            f"ours {res.worst:.1e} / torch.nn {res.ref_worst:.1e}"
        print(f"{row}{diff:>{width}} {worst_key:<26} {verdict}   [{i}/{len(configs)}]", flush=True)
    print("-" * len(header))
    took = time.perf_counter() - start
    if failures:
        raised = f", {errored} of them raised an error" if errored else ""
        print(f"FAIL: {failures} of {len(configs)} configurations out of tolerance{raised} ({took:.1f} s)")
        return 1
    print(f"PASS: all {len(configs)} configurations within tolerance ({took:.1f} s)")
    return 0


# ---------------------------------------------------------------- bench
def bench(args) -> int:
    import json
    import warnings

    from . import bench as b

    device = args.device
    warnings.filterwarnings("ignore", message="LSTM with projections is not supported")

    def chosen(rows):
        return [r for r in rows if not args.only or any(key.lower() in r.name().lower() for key in args.only)]

    rows = chosen(b.default_rows(device)) if args.suite in ("all", "sequence") else []
    steps = chosen(b.step_rows()) if args.suite in ("all", "step") else []
    if args.list:
        for row in rows + steps:
            print(row.name())
        return 0
    if not _require(device):
        return 2
    machine = _describe(device)
    print(f"rnnext vs torch.nn speed — {machine}")
    if device.type == "cpu":
        print(f"median of {args.repeats} interleaved repeats; fwd = inference (no grad), "
              "train = forward + backward\n", flush=True)
    else:
        print(f"median of {args.repeats} interleaved repeats, timed with CUDA events; fwd = inference (no grad), "
              "train = forward + backward")
        print(f"torch.nn: cuDNN defaults (allow_tf32={torch.backends.cudnn.allow_tf32}, "
              f"benchmark={torch.backends.cudnn.benchmark}); GEMM floor: torch.mm/bmm on the GPU, "
              f"TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}\n", flush=True)
    progress = lambda s: print(s, flush=True)  # noqa: E731
    report = {}
    if rows:
        results = b.run(rows, repeats=args.repeats, progress=progress, device=device)
        print("\nWhole sequences\n")
        print(b.table(results))
        report = b.to_json(results, machine, _device_fields(device))
    if steps:
        print("\nOne time step per call (*Cell modules; layers called on one step with the carried state;"
              " decoding loops)\n", flush=True)
        step_results = b.run_steps(steps, repeats=args.repeats, progress=progress, device=device)
        print()
        print(b.table(step_results, unit="us"))
        step_report = b.to_json(step_results, machine, _device_fields(device))
        report = {**step_report, "results": [], **report, "step_results": step_report["results"],
                  "step_geomean_speedup": step_report["geomean_speedup"]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def main(argv=None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="python -m rnnext", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"rnnext {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command")
    device_help = ("where both modules run: cpu (default), cuda or cuda:N; "
                   "exit status 2 when no CUDA device is available")
    p_check = sub.add_parser("check", help="parity report against torch.nn (exit 1 on any FAIL); --device cuda for a GPU")
    p_check.add_argument("--quick", action="store_true", help="float64 configurations only")
    p_check.add_argument("--device", type=_device_arg, default="cpu",
                         help=device_help + " (float16 and bfloat16 are measured against a float64 oracle)")
    p_check.set_defaults(func=check)
    p_bench = sub.add_parser("bench", help="speed report against torch.nn; --device cuda for a GPU")
    p_bench.add_argument("--repeats", type=int, default=7, help="interleaved repeats per row (median)")
    p_bench.add_argument("--only", nargs="*", metavar="TEXT",
                         help="run only the rows whose name contains any of these (see --list)")
    p_bench.add_argument("--list", action="store_true", help="print the row names (of --suite, on --device) and exit")
    p_bench.add_argument("--suite", choices=("all", "sequence", "step"), default="all",
                         help="whole sequences, one step per call, or both (default)")
    p_bench.add_argument("--json", help="also write the results to this JSON file")
    p_bench.add_argument("--device", type=_device_arg, default="cpu",
                         help=device_help + " (on CUDA timed with CUDA events, two more rows)")
    p_bench.set_defaults(func=bench)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

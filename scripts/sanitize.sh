#!/usr/bin/env bash
# Builds rnnext's CPU extension with a sanitizer and runs a representative part of the tests
# on that build, in a copy of the tracked tree (the checkout's own build is left alone).
#
#   scripts/sanitize.sh undefined   # UndefinedBehaviorSanitizer (+ float-cast-overflow)
#   scripts/sanitize.sh address     # AddressSanitizer, its runtime preloaded into Python
#
# Uses .venv/bin/python (PYTHON=... to change). Every finding stops the run with a report;
# the exit status is the tests'. CI runs both (.ci/run).
set -euo pipefail
kind=${1:?usage: scripts/sanitize.sh undefined|address}
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/rnnext-sanitize-$kind.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$repo" && git ls-files -z | xargs -0 cp --parents -t "$work")
cd "$work"
echo "== building with -fsanitize=$kind in $work =="
if ! RNNEXT_CPU_ONLY=1 RNNEXT_SANITIZE=$kind MAX_JOBS=2 "$python" setup.py build_ext --inplace \
    > build.log 2>&1; then
  tail -n 40 build.log
  exit 1
fi
# The CPU kernels' routes (GEMM kernels and their remainders, blocks, chunks, packed steps),
# the ops' argument checks and layouts, cells, gradients, non-finite values, threads.
tests=(tests/test_cpu_gemm.py tests/test_parity.py tests/test_packed.py tests/test_blocked_paths.py
       tests/test_cells.py tests/test_errors.py tests/test_gradcheck.py tests/test_robustness.py
       tests/test_inference_path.py tests/test_options.py tests/test_cpu_bf16_gemm.py)
# Resident memory under AddressSanitizer's quarantine grows by design: the leak test is left out.
deselect=(--deselect tests/test_robustness.py::test_no_memory_growth_over_10000_calls)
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if [ "$kind" = address ]; then
  # libstdc++ too: Python itself does not load it, and ASan's interceptor of C++ throws
  # must find the real __cxa_throw when it starts.
  LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
  export LD_PRELOAD
  # Leaks: Python and torch keep allocations until exit by design, so only invalid accesses.
  # allocator_may_return_null: the tests of huge sizes expect the allocation to fail, not abort.
  export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:symbolize=1:allocator_may_return_null=1
fi
echo "== tests on the $kind build =="
# -s: a report is written to stderr as the process stops, which pytest would otherwise swallow.
"$python" -m pytest -q -s -p no:cacheprovider "${tests[@]}" "${deselect[@]}"

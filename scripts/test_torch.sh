#!/usr/bin/env bash
# Builds rnnext against a given torch version and runs the whole suite on that build, in a
# copy of the tracked tree (the checkout's own build is left alone).
#
#   scripts/test_torch.sh 2.4.1     # the oldest torch rnnext claims (setup.py: torch>=2.4)
#
# The venv is .venv-torch-<version> in the checkout, made on first use and kept. torch wheels
# before 2.13 come as CUDA builds here; the extension is built CPU-only (RNNEXT_CPU_ONLY=1),
# since their CUDA need not match the installed nvcc. Exit status: the tests'.
set -euo pipefail
version=${1:?usage: scripts/test_torch.sh TORCH_VERSION}
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$repo/.venv-torch-$version
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$version" numpy ninja pytest
fi
"$venv/bin/python" -c "import torch; print('== torch', torch.__version__, '==')"
work=$(mktemp -d "${TMPDIR:-/tmp}/rnnext-torch-$version.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$repo" && git ls-files -z | xargs -0 cp --parents -t "$work")
cd "$work"
if ! RNNEXT_CPU_ONLY=1 MAX_JOBS=2 "$venv/bin/python" setup.py build_ext --inplace > build.log 2>&1; then
  tail -n 40 build.log
  exit 1
fi
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests

#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU: build rnnext for the GPU present, run the CUDA tests,
# `check --device cuda` and the GPU bench, and write every log to OUTDIR (the lent GPU machines
# give a session 15 minutes in all, so this is sized to finish in about 8).
#
#   scripts/gpu_check.sh OUTDIR        (PYTHON=python3, TORCH_CUDA_ARCH_LIST=9.0 by default)
#
# Each step has its own time limit and a failing step does not stop the later ones; the last
# lines printed (and OUTDIR/summary.txt) say what passed.
set -u
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
workers=${WORKERS:-8}
summary="$out/summary.txt"
: > "$summary"

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with its output in OUTDIR/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local line="$name: exit $rc in $((SECONDS - start)) s"
  [ "$rc" = 124 ] && line="$line (timed out after $limit s)"
  echo "$line" | tee -a "$summary"
  tail -n 3 "$out/$name.log" | sed 's/^/    /' | tee -a "$summary"
  return $rc
}

step env 30 bash -c "nvidia-smi; $py -c 'import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name())'; nvcc --version"
if ! step build 240 "$py" setup.py build_ext --inplace; then
  echo "build failed: see $out/build.log" | tee -a "$summary"
  exit 1
fi
step registered 30 "$py" -c "
import torch, rnnext
assert rnnext._C.built_with_cuda(), 'built without the CUDA kernels'
for cell in ('rnn_tanh', 'rnn_relu', 'gru', 'lstm'):
    for part in ('forward', 'backward'):
        name = f'rnnext::{cell}_layer_{part}'
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, 'CUDA'), name
print('every op has a CUDA kernel')"
# A first smoke test, so a broken kernel shows in seconds and in the simplest form.
step smoke 60 "$py" -c "
import torch, rnnext
torch.backends.cudnn.allow_tf32 = False
for cls in (rnnext.LSTM, rnnext.GRU, rnnext.RNN):
    ref = getattr(torch.nn, cls.__name__)(8, 16, num_layers=2, bidirectional=True).cuda().double()
    ours = cls.from_torch(ref)
    x = torch.randn(5, 3, 8, device='cuda', dtype=torch.float64, requires_grad=True)
    out_ref, out = ref(x)[0], ours(x)[0]
    g_ref, = torch.autograd.grad(out_ref.sum(), x)
    g, = torch.autograd.grad(out.sum(), x)
    print(cls.__name__, 'output', (out - out_ref).abs().max().item(), 'grad_x', (g - g_ref).abs().max().item())
    assert torch.allclose(out, out_ref, atol=1e-12) and torch.allclose(g, g_ref, atol=1e-12)"
xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n "$workers")
export RNNEXT_EXPECT_CUDA=1  # the test that every op has a CUDA kernel asserts it
step tests_cuda 240 "$py" -m pytest -q -ra --durations=15 "${xdist[@]}" -k "cuda or CUDA" tests
step check_cuda 120 "$py" -m rnnext check --device cuda
step bench_cuda 150 "$py" -m rnnext bench --device cuda --repeats 5 --json "$out/bench_cuda.json"
if command -v compute-sanitizer >/dev/null 2>&1; then
  step sanitizer 60 compute-sanitizer --tool memcheck --error-exitcode 3 "$py" -c "
import torch, rnnext
for cls in (rnnext.LSTM, rnnext.GRU, rnnext.RNN):
    m = cls(4, 8, num_layers=2, bidirectional=True).cuda()
    x = torch.randn(3, 2, 4, device='cuda', requires_grad=True)
    m(x)[0].sum().backward()
m = rnnext.LSTM(4, 8, proj_size=3).cuda()
p = torch.nn.utils.rnn.pack_sequence([torch.randn(n, 4, device='cuda') for n in (5, 2, 3)], enforce_sorted=False)
m(p)[0].data.sum().backward()
torch.cuda.synchronize(); print('sanitizer case ran')"
fi
echo "done; logs in $out" | tee -a "$summary"

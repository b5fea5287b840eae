#!/usr/bin/env bash
# Everything fastblock needs a GPU for, in one run of at most 8 minutes on one H100/H200 class GPU (a fresh
# machine: most of it is Triton compiling kernels on the CPU), writing at most 8 files to $OUT (default
# bench/out/gpu-verify). Each stage is time-boxed, so one slow stage cannot eat the others' time; a failed or
# timed-out stage is recorded in status.txt and the next one runs. Worst case: the slowest lane (180 s) + doctor,
# bench and train (265 s) + 5 s of grace for each box killed on the way (25 s) = 470 s, and seconds for the
# version line and the benchmark report.
#
#   bash bench/gpu_verify.sh [DATA]     # DATA: CIFAR-10 in any form --data-dir takes (skip the training stage: none)
#
#   stage          box    writes
#   (three lanes at once)
#   tests-triton   170 s  tests.log    tests/test_gpu.py for Triton, 12 workers (it needs no extension)
#   build          120 s  build.log    versions, the extension built with its CUDA kernels for this GPU,
#   tests-ext       60 s  build.log      then tests/test_gpu.py for the extension
#   data            50 s  train.log    CIFAR-10 decoded into the cache,
#   warm           110 s  train.log      then a few training steps: the run's kernels compiled into the caches
#   (then one at a time, the GPU to itself)
#   doctor          70 s  doctor.txt   python -m fastblock.doctor: availability, correctness, speed table
#   bench           70 s  bench.json   pytest-benchmark target cases (fwd+bwd bf16 N=512 K=4 at the four stage
#                                      shapes); report.md: its log + table
#   train          125 s  train.log    the default GPU preset for a 75-second time budget; summary.json: accuracy
#                         status.txt   one line per stage: exit code and seconds
#
# GPU_VERIFY_QUICK=1 shrinks every stage to a CPU smoke run (tests/test_gpu_verify.py runs it in CI).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu-verify}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
QUICK=${GPU_VERIFY_QUICK:-0}
DATA=${1:-}
export PYTHONUNBUFFERED=1 FASTBLOCK_TEST_FAILURES_NOW=1
: > "$OUT/status.txt"
failed_flag=$(mktemp)
trap 'rm -f "$failed_flag"' EXIT

stage() {  # stage NAME SECONDS LOG CMD...: run CMD time-boxed, output appended to $OUT/LOG, result to status.txt
  local name=$1 box=$2 log=$3
  shift 3
  echo "== $name (at most $box s): $*" | tee -a "$OUT/$log"
  local t0=$SECONDS
  timeout --kill-after=5 "$box" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  echo "$name exit $rc after $((SECONDS - t0)) s$([ "$rc" -eq 124 ] && echo ' (timed out)')" | tee -a "$OUT/status.txt"
  [ "$rc" -eq 0 ] || echo "$name" >> "$failed_flag"
  return "$rc"
}

$PY - > "$OUT/build.log" 2>&1 <<'PYEOF'
import datetime, platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "none"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
cap = ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else "-"
print(f"date {datetime.date.today()}  device {dev} (sm {cap})  torch {torch.__version__} (CUDA {torch.version.cuda})"
      f"  triton {tv}  python {platform.python_version()}")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total \
  --format=csv,noheader >> "$OUT/build.log" 2>&1

# pytest options where the plugins exist: workers (Triton compiles on the CPU), one line per test as it finishes
# (a timed-out stage still shows what passed), a per-test limit (a hung kernel fails one test, not the stage)
pytest_opts=(-v --tb=short -p no:cacheprovider -rs)
$PY -c "import pytest_timeout" 2>/dev/null && pytest_opts+=(--timeout 100)
workers() { $PY -c "import xdist" 2>/dev/null && echo "-n $1"; }

if [ "$QUICK" = 1 ]; then
  boxes=(300 300 300 300 300 300 300 300)
  build_env=()
  tests_sel=(--collect-only)
  doctor_args=(--quick --device cpu)
  bench_args=(--smoke -k "fwdbwd")
  warm_args=(--preset tiny --subset 100 --epochs 1 --device cpu)
  train_args=(--preset tiny --subset 200 --epochs 1 --device cpu)
else
  #      build tests-triton tests-ext data warm doctor bench train
  boxes=(120   170          60        50   110  70     70    125)  # tests/test_gpu_verify.py checks the sum
  build_env=(FASTBLOCK_EXT_CUDA=1 "MAX_JOBS=$(nproc)")
  tests_sel=()
  doctor_args=()
  bench_args=(-k "fwdbwd and N512 and not compiled")
  warm_args=(--time-budget 0.1)
  train_args=(--time-budget 1.25)
fi

# Three lanes at once (the GPU is barely used while Triton compiles on the CPU): the Triton GPU tests; the
# extension's build, then its GPU tests; the data decoding, then a few training steps that compile the training
# run's kernels into the caches (without the extension: it may still be building), so the timed run below trains.
stage tests-triton "${boxes[1]}" tests.log env FASTBLOCK_NO_EXT=1 "$PY" -m pytest "${pytest_opts[@]}" \
  $(workers 12) tests/test_gpu.py -k triton "${tests_sel[@]}" &
(
  stage build "${boxes[0]}" build.log env "${build_env[@]}" "$PY" -m fastblock.extension --build
  stage tests-ext "${boxes[2]}" build.log "$PY" -m pytest "${pytest_opts[@]}" $(workers 4) tests/test_gpu.py \
    -k extension "${tests_sel[@]}"
) &
if [ -n "$DATA" ]; then
  (
    stage data "${boxes[3]}" train.log "$PY" -c "import sys; from fastblock.data import load_cifar10; \
print(load_cifar10(sys.argv[1], download=False, progress=False).source)" "$DATA" &&
    stage warm "${boxes[4]}" train.log env FASTBLOCK_NO_EXT=1 "$PY" -m fastblock.train --data-dir "$DATA" \
      --no-progress --checkpoint-minutes 0 --out "$(mktemp -d)/warm" "${warm_args[@]}"
  ) &
fi
wait
stage doctor "${boxes[5]}" doctor.txt "$PY" -m fastblock.doctor "${doctor_args[@]}"
stage bench "${boxes[6]}" report.md "$PY" -m pytest bench/test_block_bench.py -q -p no:cacheprovider \
  "${bench_args[@]}" --benchmark-json "$OUT/bench.json"
if [ -s "$OUT/bench.json" ]; then
  "$PY" -m bench.report "$OUT/bench.json" --markdown >> "$OUT/report.md" 2>&1 || echo report >> "$failed_flag"
fi
if [ -n "$DATA" ]; then
  run_dir=${GPU_VERIFY_RUNS:-runs}/gpu-verify-$(date +%Y%m%d-%H%M%S)  # a new run directory every time
  stage train "${boxes[7]}" train.log "$PY" -m fastblock.train --data-dir "$DATA" --no-progress \
    --checkpoint-minutes 0 --out "$run_dir" "${train_args[@]}"
  if [ -f "$run_dir/summary.json" ]; then cp "$run_dir/summary.json" "$OUT/summary.json"; else echo summary >> "$failed_flag"; fi
else
  echo "train skipped (no DATA given)" | tee -a "$OUT/status.txt"
fi
echo "== results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
[ -s "$failed_flag" ] && exit 1
exit 0

#!/usr/bin/env bash
# Everything fastblock needs a GPU for, in one run of at most 8 minutes on one H100/H200 class GPU, writing at most
# 8 files to $OUT (default bench/out/gpu-verify). Each stage is time-boxed, so one slow stage cannot eat the others'
# time; a failed or timed-out stage is recorded in status.txt and the next one runs.
#
#   bash bench/gpu_verify.sh [DATA]     # DATA: CIFAR-10 in any form --data-dir takes (skip the training stage: none)
#
#   stage   box    writes
#   build    75 s  build.log      versions, the extension built with its CUDA kernels
#   tests   120 s  tests.log      tests/test_gpu.py: every backend vs the reference at the CIFAR shapes, fp32/bf16/fp16
#   doctor   75 s  doctor.txt     python -m fastblock.doctor: availability, correctness, speed table
#   bench    90 s  bench.json     pytest-benchmark target cases (fwd+bwd bf16 N=512 K=4); report.md: its log + table
#   train   110 s  train.log      the default GPU preset for a 75-second time budget; summary.json: accuracy reached
#                  status.txt     one line per stage: exit code and seconds
#
# GPU_VERIFY_QUICK=1 shrinks every stage to a CPU smoke run (tests/test_gpu_verify.py runs it in CI).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu-verify}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
QUICK=${GPU_VERIFY_QUICK:-0}
DATA=${1:-}
export PYTHONUNBUFFERED=1
: > "$OUT/status.txt"
failed=0

stage() {  # stage NAME SECONDS LOG CMD...: run CMD time-boxed, output to $OUT/LOG, result to status.txt
  local name=$1 box=$2 log=$3
  shift 3
  echo "== $name (at most $box s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$box" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  echo "$name exit $rc after $((SECONDS - t0)) s$([ "$rc" -eq 124 ] && echo ' (timed out)')" | tee -a "$OUT/status.txt"
  [ "$rc" -eq 0 ] || failed=1
}

$PY - > "$OUT/build.log" 2>&1 <<'PYEOF'
import datetime, platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "none"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(f"date {datetime.date.today()}  device {dev}  torch {torch.__version__}  triton {tv}  python {platform.python_version()}")
PYEOF

if [ "$QUICK" = 1 ]; then
  stage build 300 build.log "$PY" -m fastblock.extension --build
  stage tests 300 tests.log "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py --collect-only
  stage doctor 300 doctor.txt "$PY" -m fastblock.doctor --quick --device cpu
  stage bench 300 report.md "$PY" -m pytest bench/ -q -p no:cacheprovider --smoke -k "fwdbwd" \
    --benchmark-json "$OUT/bench.json"
  train_args=(--preset tiny --subset 200 --epochs 1 --device cpu)
else
  stage build 75 build.log env FASTBLOCK_EXT_CUDA=1 "$PY" -m fastblock.extension --build
  stage tests 120 tests.log "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
  stage doctor 75 doctor.txt "$PY" -m fastblock.doctor
  stage bench 90 report.md "$PY" -m pytest bench/test_block_bench.py -q -p no:cacheprovider -k "fwdbwd and N512" \
    --benchmark-json "$OUT/bench.json"
  train_args=(--time-budget 1.25)
fi
if [ -f "$OUT/bench.json" ]; then
  "$PY" -m bench.report "$OUT/bench.json" --markdown >> "$OUT/report.md" 2>&1 || failed=1
fi
if [ -n "$DATA" ]; then
  run_dir=${GPU_VERIFY_RUNS:-runs}/gpu-verify-$(date +%Y%m%d-%H%M%S)  # a new run directory every time
  stage train "$([ "$QUICK" = 1 ] && echo 300 || echo 110)" train.log "$PY" -m fastblock.train --data-dir "$DATA" \
    --no-progress --checkpoint-minutes 0 --out "$run_dir" "${train_args[@]}"
  if [ -f "$run_dir/summary.json" ]; then cp "$run_dir/summary.json" "$OUT/summary.json"; else failed=1; fi
else
  echo "train skipped (no DATA given)" | tee -a "$OUT/status.txt"
fi
echo "== results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $failed

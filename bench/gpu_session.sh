#!/usr/bin/env bash
# Every GPU check of fastblock, for any machine with an NVIDIA GPU, in stages of under 10 minutes each. Logs and
# results go to $OUT (default bench/out/gpu-session): at most 8 files per stage (logs, pytest-benchmark JSON, the
# report as markdown + plot, each training run's summary.json / metrics.csv).
#
#   bash bench/gpu_session.sh check            # extension build (with CUDA), Triton AOT compile of every kernel
#   bash bench/gpu_session.sh tests            # the whole test suite, GPU tests included
#   bash bench/gpu_session.sh bench            # pytest-benchmark quick subset + report (bf16, N=512, K=4)
#   bash bench/gpu_session.sh train BACKEND    # default preset on CIFAR-10 from $GPU_SESSION_DATA
#
# GPU_SESSION_DATA: anything the trainer's --data-dir takes (default data/cifar10-jpeg.tar.gz). GPU_SESSION_QUICK=1
# shrinks every stage to a smoke run; tests/test_gpu_session.py uses it on CPU so this script cannot rot unnoticed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu-session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
QUICK=${GPU_SESSION_QUICK:-0}
export PYTHONUNBUFFERED=1
stage=${1:-}
status=0

step() {  # step NAME CMD...: run, tee the log to $OUT/NAME.log, remember a failure but go on
  local name=$1
  shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

versions() {
  $PY - <<'EOF'
import datetime, platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "none"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(f"date {datetime.date.today()}  device {dev}  torch {torch.__version__}  triton {tv}  python {platform.python_version()}")
EOF
}

case "$stage" in
  check)
    versions | tee "$OUT/versions.txt"
    step extension "$PY" -m fastblock.extension --build
    if [ "$QUICK" = 1 ]; then
      echo "== aot-check: skipped in quick mode (CI runs it)"
    else
      step aot-check env -u TRITON_INTERPRET "$PY" -m fastblock.triton_kernels.aot_check
    fi
    ;;
  tests)
    versions | tee "$OUT/versions.txt"
    if [ "$QUICK" = 1 ]; then set -- tests/test_gpu.py --collect-only; else set -- tests/; fi
    step tests "$PY" -m pytest -q -p no:cacheprovider -rs "$@"
    ;;
  bench)
    versions | tee "$OUT/versions.txt"
    if [ "$QUICK" = 1 ]; then set -- --smoke; else set --; fi
    step bench "$PY" -m pytest bench/ -q -p no:cacheprovider "$@" --benchmark-json "$OUT/bench.json"
    step report "$PY" -m bench.report "$OUT/bench.json" --markdown --plot "$OUT/speedup.png"
    ;;
  train)
    backend=${2:?usage: gpu_session.sh train triton|extension|reference}
    data=${GPU_SESSION_DATA:-data/cifar10-jpeg.tar.gz}
    [ -e "$data" ] || { echo "no data at $data: set GPU_SESSION_DATA to CIFAR-10 in any form --data-dir takes" >&2; exit 2; }
    versions | tee "$OUT/versions.txt"
    extra=()
    [ "$QUICK" = 1 ] && extra=(--preset tiny --epochs 1 --subset 200 --device cpu)
    # outside $OUT, which keeps to 8 files per stage; a new directory per run, never an earlier run's
    run_dir=${GPU_SESSION_RUNS:-runs}/gpu-$backend-$(date +%Y%m%d-%H%M%S)
    step "train-$backend" "$PY" -m fastblock.train --data-dir "$data" --backend "$backend" --no-progress \
      --cache-dir "${GPU_SESSION_CACHE:-.cache/fastblock}" --out "$run_dir" "${extra[@]}"
    for f in summary.json metrics.csv; do
      if [ -f "$run_dir/$f" ]; then cp "$run_dir/$f" "$OUT/$backend-$f"; else status=1; fi
    done
    ;;
  *)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
exit $status

#!/usr/bin/env bash
# What a session lent a GPU should run, one device call per step (each must end within 10 minutes;
# the machine is released when idle, so every call builds the extension unless it is still warm):
#   here:   bash scripts/device_wheels.sh
#   device: run(command="bash scripts/gpu_session.sh tests", carry=[".whl"], timeout_s=600)
#           run(command="bash scripts/gpu_session.sh bench-kernels", carry=[".whl"], timeout_s=600)
#           run(command="bash scripts/gpu_session.sh bench-rest", carry=[".whl"], timeout_s=600)
# tests: `pytest -m gpu`. bench-kernels: encode+TopK, fused edit, decode (each its own process and
# time limit). bench-rest: histogram, train, scan, corpus passes vs a plain HF loop, `snce-fast bench`. Logs and results.tar.gz
# (benchmarks/results/*) land in $OUT after every step, so a step that runs out of time loses only
# itself. Unpack results.tar.gz into benchmarks/results/ here and commit the *_gpu.json / *.png files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
what="${1:-tests}"
case "$what" in tests|bench-kernels|bench-rest) ;; *) echo "unknown step '$what': expected tests, bench-kernels or bench-rest"; exit 2;; esac

save() { tar czf "$OUT/results.tar.gz" benchmarks/results 2>/dev/null; }
step() {  # step <seconds> <label> <command...>: run with a time limit, log, save results
  local t=$1 label=$2; shift 2
  echo "== $label (limit ${t}s)" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$t" "$@" 2>&1 | tee -a "$LOG"
  echo "== $label: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
  save
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
if (cd /tmp && python3 -c "import snce_fast._C, snce_fast.kernels") 2>/dev/null; then  # installed, not just a .so here
  echo "snce_fast already built on this (warm) machine" | tee -a "$LOG"
else
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . \
    2>&1 | tail -5 | tee -a "$LOG"
fi
python3 -m snce_fast.info | tee -a "$LOG"

case "$what" in
  tests)
    step 420 "pytest -m gpu" python3 -m pytest -q -m gpu tests -p no:cacheprovider
    ;;
  bench-kernels)
    step 200 "bench_encode_topk" python3 benchmarks/bench_encode_topk.py
    step 130 "bench_edit" python3 benchmarks/bench_edit.py
    step 70 "bench_decode" python3 benchmarks/bench_decode.py
    ;;
  bench-rest)
    step 90 "bench_histogram" python3 benchmarks/bench_histogram.py
    step 120 "bench_train" python3 benchmarks/bench_train.py
    step 90 "bench_scan" python3 benchmarks/bench_scan.py
    step 150 "bench_corpus" python3 benchmarks/bench_corpus.py --passes scan,detect,calibrate --reps 2
    step 60 "snce-fast bench" snce-fast bench --out benchmarks/results/cli_bench_gpu.json
    ;;
esac
echo "done: $(ls "$OUT")"

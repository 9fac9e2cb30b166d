#!/usr/bin/env bash
# What a session lent a GPU should run, in two device calls (each must end within 10 minutes; the
# machine stays warm between them, so the second skips most of the build):
#   here:   bash scripts/device_wheels.sh
#   device: run(command="bash scripts/gpu_session.sh tests", carry=[".whl"], timeout_s=600)
#           run(command="bash scripts/gpu_session.sh bench", carry=[".whl"], timeout_s=600)
# It installs the carried wheels, builds the CUDA extension for sm_90, runs the GPU tests and every
# benchmark, and leaves in $OUT: gpu_tests.log, bench.log, results.tar.gz (benchmarks/results/*).
# Unpack results.tar.gz into benchmarks/results/ here and commit the *_gpu.json / *.png files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/bench.log"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" python3 -m pip install -q --no-build-isolation --no-deps -e . \
  2>&1 | tail -5 | tee -a "$OUT/bench.log"
python3 -m snce_fast.info | tee -a "$OUT/bench.log"
what="${1:-tests}"
if [ "$what" = tests ]; then
  timeout 420 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
else
  for spec in "run_all.py:240" "bench_histogram.py:60" "bench_train.py:90" "bench_scan.py:60"; do
    b=${spec%%:*}; t=${spec##*:}
    echo "== benchmarks/$b (limit ${t}s)" | tee -a "$OUT/bench.log"
    timeout "$t" python3 "benchmarks/$b" 2>&1 | tee -a "$OUT/bench.log"
  done
  timeout 60 snce-fast bench --out benchmarks/results/cli_bench_gpu.json 2>&1 | tee -a "$OUT/bench.log"
  tar czf "$OUT/results.tar.gz" benchmarks/results
fi
echo "done: $(ls "$OUT")"

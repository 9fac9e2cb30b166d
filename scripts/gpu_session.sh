#!/usr/bin/env bash
# The GPU run, one command on a fresh machine without network, inside 8 minutes (docs/performance.md,
# "The GPU run"):
#   here:   bash scripts/device_wheels.sh                 # .whl/: diffusers, importlib_metadata, nudenet, ninja + SOURCE
#           DRY_RUN=1 bash scripts/gpu_session.sh          # the plan, and every step a CPU can do, in a copy of the tree
#   device: run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=540)
# Steps of the default `quick` session, each under its own time limit and all under BUDGET_S (default 465 s;
# a dry run multiplies limits and budget by 4, since the benchmarks then run interpreted on the CPU):
#   setup (wheels, pip list, versions) -> Triton benchmarks (encode+TopK, fused edit, decode: prompts 1/16/64,
#   n 32768, k 64, two tuning candidates; no n 524288) -> C++/CUDA extension build (ninja) -> `pytest -m gpu` of
#   the kernel and histogram tests. After every step $OUT/results.tar.gz is rewritten (benchmarks/results/*_gpu.*,
#   pip_list.txt, session_info.json, session.log), so a step that runs out of time loses only itself. Unpack it
#   into the repo root here and commit the *_gpu.json / *.png files.
# Other steps (each its own device call, as before): tests (all GPU tests), bench-kernels (the full kernel
# benchmarks), bench-rest (histogram, train, scan, corpus, `snce-fast bench`).
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-quick}"
case "$what" in quick|tests|bench-kernels|bench-rest) ;;
  *) echo "unknown step '$what': expected quick (default), tests, bench-kernels or bench-rest" >&2; exit 2;; esac
DRY="${DRY_RUN:-0}"
if [ "$what" = quick ]; then BUDGET="${BUDGET_S:-465}"; else BUDGET="${BUDGET_S:-570}"; fi
SCALE=1
if [ "$DRY" = "1" ]; then SCALE=4; BUDGET=$(( BUDGET * SCALE )); fi  # CPU mode: the interpreter is slow
PROMPTS="1 16 64"
CANDIDATES=2
GPU_TESTS=(tests/fused_kernels tests/ops/test_histogram.py tests/ops/test_backend.py)
# the quick set leaves out n 524288 and its fp32 reference, and the two Inductor compiles (tens of seconds each on
# a cold machine, inside a 120 s step); the `tests` step runs them
GPU_TESTS_K="not 524288 and not compile_inductor"

if [ "$DRY" = "1" ]; then
  # run in a copy of what the device tool sends (tracked + untracked-not-ignored files, plus .whl), so that the
  # CPU-mode benchmark files never overwrite the committed ones
  src=$PWD
  work=$(mktemp -d)/tree
  mkdir -p "$work"
  git ls-files -z --cached --others --exclude-standard | (cd "$src" && xargs -0 cp --parents -t "$work" 2>/dev/null)
  [ -d .whl ] && cp -r .whl "$work/"
  cd "$work" || exit 1
  echo "DRY RUN in a copy of the tree: $work"
fi
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
t0=$SECONDS
failed=()
log() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - (SECONDS - t0) )); }
save() {
  python3 - "$OUT" <<'PY' 2>>"$LOG"
import glob, os, sys, tarfile
out = sys.argv[1]
with tarfile.open(os.path.join(out, "results.tar.gz.tmp"), "w:gz") as t:
    for f in sorted(glob.glob("benchmarks/results/*_gpu*")) + [os.path.join(out, n) for n in
                                                               ("pip_list.txt", "session_info.json", "session.log")]:
        if os.path.exists(f):
            t.add(f, arcname=f if f.startswith("benchmarks/") else os.path.join("benchmarks/results/gpu_session",
                                                                                  os.path.basename(f)))
os.replace(os.path.join(out, "results.tar.gz.tmp"), os.path.join(out, "results.tar.gz"))
PY
}
step() {  # step <limit seconds> <label> <command...>: within the budget left, logged, results saved after
  local t=$(( $1 * SCALE )) label=$2; shift 2
  local rest; rest=$(left)
  if [ "$rest" -lt 20 ]; then log "== $label: SKIPPED, only ${rest}s of the ${BUDGET}s budget left"; return; fi
  [ "$t" -gt "$rest" ] && t=$rest
  log "== $label (limit ${t}s, $(left)s of the budget left)"
  local start=$SECONDS
  if [ "$DRY" = "1" ] && [ "${DRY_SKIP:-0}" = "1" ]; then
    log "   (dry run: not run here) $*"
  else
    if [ "$DRY" = "1" ]; then timeout "$t" nice "$@" 2>&1 | tee -a "$LOG"; else timeout "$t" "$@" 2>&1 | tee -a "$LOG"; fi
    local rc=${PIPESTATUS[0]}
    log "== $label: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$label (exit $rc)")
  fi
  save
}

# --- setup: wheels, import path, pip list, versions ----------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  if [ "$DRY" = "1" ]; then  # cp312 wheels do not install on this Python: check they are whole and ninja is there
    for w in .whl/*.whl; do python3 -m zipfile -t "$w" >/dev/null || { log "broken wheel $w"; exit 1; }; done
    ls .whl/ninja-*.whl >/dev/null 2>&1 || { log "no ninja wheel in .whl: run scripts/device_wheels.sh"; exit 1; }
    log "wheels ok: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
    export PATH="/tmp/site/bin:$PATH"  # the carried ninja
  fi
else
  log "WARNING: no .whl/ wheelhouse (run scripts/device_wheels.sh here and carry .whl): diffusers tests skip"
fi
[ -e snce_fast/kernels ] || ln -s ../kernels snce_fast/kernels  # what an install maps; git-ignored, so not sent
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:/tmp/site"
python3 -m pip list 2>/dev/null > "$OUT/pip_list.txt"
log "pip list: $(wc -l < "$OUT/pip_list.txt") packages ($OUT/pip_list.txt)"
python3 - "$OUT/session_info.json" "$what" "$DRY" <<'PY' 2>&1 | tee -a "$LOG"
import datetime, json, os, platform, subprocess, sys
import torch
info = dict(step=sys.argv[2], dry_run=sys.argv[3] == "1", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    info["source"] = dict(line.split(" ", 1) for line in open(".whl/SOURCE").read().splitlines())
except OSError:
    info["source"] = None
try:
    info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    info["git_commit"] = None
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    info["nvidia_smi"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "setup failed: python3 with torch is needed"; save; exit 1; }
save

build() {
  if (cd /tmp && python3 -c "import snce_fast._C, snce_fast.kernels") 2>/dev/null; then
    log "snce_fast already built on this (warm) machine"
  else
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
      python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . 2>&1 | tail -5
  fi
  python3 -m snce_fast.info
}

case "$what" in
  quick)
    # Triton kernels need no extension: benchmark them first, so a slow build cannot cost their numbers
    step 130 "bench_encode_topk (prompts $PROMPTS, $CANDIDATES tuning candidates)" \
      python3 benchmarks/bench_encode_topk.py --quick --prompts $PROMPTS --tune-candidates $CANDIDATES
    step 75 "bench_edit (prompts $PROMPTS)" \
      python3 benchmarks/bench_edit.py --quick --prompts $PROMPTS --tune-candidates $CANDIDATES
    step 35 "bench_decode (prompts $PROMPTS)" python3 benchmarks/bench_decode.py --quick --prompts $PROMPTS
    if [ "$DRY" = "1" ]; then
      DRY_SKIP=1 step 90 "extension build (TORCH_CUDA_ARCH_LIST=9.0, ninja)" build
      step 30 "collect the GPU tests (dry run: collect only)" \
        python3 -m pytest -q --collect-only -m gpu -p no:cacheprovider -k "$GPU_TESTS_K" "${GPU_TESTS[@]}"
    else
      step 90 "extension build (TORCH_CUDA_ARCH_LIST=9.0, ninja)" build
      step 120 "pytest -m gpu: kernels and histograms (not n 524288)" \
        python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 80 -k "$GPU_TESTS_K" "${GPU_TESTS[@]}"
    fi
    ;;
  tests)
    step 100 "extension build" build
    step 420 "pytest -m gpu" python3 -m pytest -q -m gpu tests -p no:cacheprovider
    ;;
  bench-kernels)
    step 200 "bench_encode_topk" python3 benchmarks/bench_encode_topk.py
    step 130 "bench_edit" python3 benchmarks/bench_edit.py
    step 70 "bench_decode" python3 benchmarks/bench_decode.py
    ;;
  bench-rest)
    step 100 "extension build" build
    step 90 "bench_histogram" python3 benchmarks/bench_histogram.py
    step 120 "bench_train" python3 benchmarks/bench_train.py
    step 90 "bench_scan" python3 benchmarks/bench_scan.py
    step 150 "bench_corpus" python3 benchmarks/bench_corpus.py --passes scan,detect,calibrate --reps 2
    step 60 "snce-fast bench" snce-fast bench --out benchmarks/results/cli_bench_gpu.json
    ;;
esac
log "done in $((SECONDS - t0)) s: $(ls "$OUT" | tr '\n' ' ')"
if [ ${#failed[@]} -gt 0 ]; then
  log "FAILED steps: ${failed[*]}"
  save
  exit 1
fi

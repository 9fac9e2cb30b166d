#!/usr/bin/env bash
# Install snce_fast into the active Python environment (a venv is recommended).
# torch comes first and the extension is built with --no-build-isolation: it must be
# compiled against the torch that is installed, and an isolated build would fetch another.
# Each step says what it does; pip lists the packages as it goes (about 10 minutes on 2 cores,
# most of it compiling the C++ extension and installing the test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${SNCE_FAST_TORCH:-torch==2.13.0}"
step() { echo "snce_fast setup [$1/3] $2" >&2; }
step 1 "pip itself"
python -m pip install -q --upgrade pip
step 2 "$TORCH_SPEC and the build tools"
python -m pip install --progress-bar on "$TORCH_SPEC" setuptools wheel ninja | grep -E "^(Collecting|Successfully)" || true
step 3 "snce_fast: compiling the C++ extension, then the test extras (the longest step; no output while it compiles)"
python -m pip install --progress-bar on --no-build-isolation -e ".[test]" | grep -E "^(Collecting|Building|Successfully)" || true
python -c "import snce_fast, snce_fast._C" || { echo "snce_fast setup: the install failed (see pip's output above)" >&2; exit 1; }
echo "snce_fast setup: done (python -m snce_fast.info shows what was built)" >&2

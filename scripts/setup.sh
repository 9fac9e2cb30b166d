#!/usr/bin/env bash
# Install snce_fast into the active Python environment (a venv is recommended).
# torch comes first and the extension is built with --no-build-isolation: it must be
# compiled against the torch that is installed, and an isolated build would fetch another.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${SNCE_FAST_TORCH:-torch==2.13.0}"
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC" setuptools wheel ninja
python -m pip install -q --no-build-isolation -e ".[test]"

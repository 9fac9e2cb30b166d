#!/usr/bin/env bash
# Download (here, with PyPI access) the wheels the lent GPU machine lacks, into .whl/ (git-ignored),
# for Python 3.12 x86-64. The device image has torch, triton, transformers, pytest, matplotlib, tqdm,
# pyarrow, onnxruntime and opencv, but not diffusers (nor importlib_metadata, which diffusers imports).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in "diffusers==0.42.1" "importlib_metadata" "nudenet==3.4.2"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$pkg"
done
ls -la .whl

#!/usr/bin/env bash
# Build (here, with PyPI access) the wheelhouse the lent GPU machine needs, into .whl/ (git-ignored, carried by
# the device tool: carry=[".whl"]), for Python 3.12 x86-64. The device image has torch, triton, transformers,
# pytest, matplotlib, tqdm, pyarrow, onnxruntime, opencv and ninja, but not diffusers (nor importlib_metadata,
# which diffusers imports); ninja is carried anyway so that the extension build never falls back to a serial
# setuptools build if the image changes. .whl/SOURCE records the commit the session runs (the device copy of
# the tree has no .git). Run it right before the device call: scripts/gpu_session.sh reads SOURCE.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl  # ignored by .gitignore (/.whl/)
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
for pkg in "diffusers==0.42.1" "importlib_metadata" "nudenet==3.4.2" "ninja"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$pkg"
done
{
  echo "commit $(git rev-parse HEAD)"
  echo "dirty_files $(git status --porcelain --untracked-files=no | wc -l)"
  echo "made $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > .whl/SOURCE
ls -la .whl
du -sh .whl

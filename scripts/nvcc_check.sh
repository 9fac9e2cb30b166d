#!/usr/bin/env bash
# Compile every csrc/*.cu for sm_80 and sm_90 with nvcc (compile only), against the
# installed torch's headers, so CUDA sources cannot rot on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
inc=$(python -c 'import torch.utils.cpp_extension as c, sysconfig; print(" ".join("-I" + p for p in c.include_paths() + [sysconfig.get_paths()["include"]]))')
abi=$(python -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
out=$(mktemp -d)
shopt -s nullglob
files=(csrc/*.cu)
[ ${#files[@]} -gt 0 ] || { echo "no .cu sources found"; exit 1; }
for f in "${files[@]}"; do
  echo "nvcc -c $f"
  # shellcheck disable=SC2086
  nvcc -c -std=c++20 -O1 -Xcompiler -w -w \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    $inc -Icsrc -DSNCE_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$abi" \
    "$f" -o "$out/$(basename "$f").o"
done
echo "compiled ${#files[@]} CUDA source(s)"

"""Run every kernel benchmark in one process: `python benchmarks/run_all.py [--quick] [--no-compile]`.

Without CUDA this is a labelled CPU mode (tiny shapes, Triton interpreter): no GPU numbers.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import bench_decode  # noqa: E402
import bench_edit  # noqa: E402
import bench_encode_topk  # noqa: E402


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    print(f"device: {C.device_name()}  mode: {C.mode().upper()}")
    if not C.ON_GPU:
        print("CPU MODE: tiny shapes; fused kernels run in the Triton interpreter. These are not GPU numbers.")
    for mod in (bench_encode_topk, bench_edit, bench_decode):
        print(f"\n== {mod.__name__} ==")
        mod.main(argv)


if __name__ == "__main__":
    main()

"""`snce-fast info`: which backends were built and which one each device uses."""
from __future__ import annotations

import argparse
from typing import Any

from snce_fast.info import report


def cmd_info(args: argparse.Namespace) -> int:
    print(report())
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "info", help="which backends were built and which one each device uses",
        description="Prints the versions of snce_fast, torch, Python and Triton, whether the C++ extension "
        "snce_fast._C was built (with OpenMP, with CUDA kernels) and the fused Triton kernels can run, whether "
        "CUDA is available, the SNCE_FAST_BACKEND override, and which backend each op (encode, decode, edit, ...) "
        "runs on for each device: triton on CUDA, cpp or the eager reference on the CPU. Reads and writes "
        "nothing; the same report as python -m snce_fast.info.",
    )
    p.set_defaults(func=cmd_info)

"""`snce-fast bench`: time snce_fast's ops against the eager reference on this machine."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from snce_fast import benchmarking
from snce_fast.cli._common import UsageError, apply_threads, atomic_write_json, check_out_file, output_lock


def cmd_bench(args: argparse.Namespace) -> int:
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    bad = [o for o in ops if o not in benchmarking.OPS]
    if bad or not ops:
        raise UsageError(f"--ops {args.ops!r}: expected a comma-separated subset of {','.join(benchmarking.OPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available on this machine")
    apply_threads(args.threads)
    if args.out:
        check_out_file(args.out)
        with output_lock(args.out):
            return _run(args, ops)
    return _run(args, ops)


def _run(args: argparse.Namespace, ops: tuple[str, ...]) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {benchmarking.device_name(device)}  torch {torch.__version__}")
    if device.type != "cuda":
        print("CPU MODE: reduced shapes, fp32. These are CPU numbers: the fused encode/edit kernels are GPU "
              "kernels (on the CPU the reference runs for them). GPU numbers need a CUDA GPU: run "
              "`snce-fast bench` or `python benchmarks/run_all.py` there.")
    rows = benchmarking.run(ops, quick=args.quick, device=str(device), progress=not args.quiet)
    print(benchmarking.table(rows))
    if args.out:
        out = Path(args.out)
        atomic_write_json(out, benchmarking.as_json(rows, device))
        print(f"wrote {out}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="time snce_fast's ops vs the eager PyTorch reference on this device",
        description="Times encode (+TopK), the residual edit, sparse decode and the histogram update with the "
        "backend snce_fast picks on this device (Triton on CUDA; C++ or reference on CPU) against the eager "
        "reference, on the same inputs, and prints a table (ms, TFLOP/s, % of dense bf16 peak on H100/H200, "
        "speedup). On CUDA: d 768, n 32768, k 64, bf16, 1-256 prompts of 77 tokens. Without a GPU it says so and "
        "benchmarks the CPU paths at reduced shapes. The full comparison (EleutherAI/SAELens-style paths, "
        "torch.compile, plots) is benchmarks/run_all.py in the source tree.",
    )
    p.add_argument("--ops", default=",".join(("encode", "edit", "decode", "histogram")),
                   help="comma-separated ops to time (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer prompt counts and repetitions")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--out", default=None, help="also write the rows + device/versions/commit/date as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar over the cases")
    p.set_defaults(func=cmd_bench)

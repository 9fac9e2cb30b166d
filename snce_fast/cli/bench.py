"""`snce-fast bench`: time snce_fast's ops against the eager reference on this machine."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from snce_fast import benchmarking
from snce_fast import corpus_benchmarks
from snce_fast.cli._common import (
    UsageError,
    add_model_args,
    apply_threads,
    atomic_write_json,
    check_out_file,
    existing_file,
    load_encoder,
    output_lock,
    positive,
    read_prompt_file,
)
from snce_fast.sae.model import SAE


def _subset(text: str, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    items = tuple(o.strip() for o in text.split(",") if o.strip())
    if not items or any(o not in allowed for o in items):
        raise UsageError(f"{flag} {text!r}: expected a comma-separated subset of {','.join(allowed)}")
    return items


def cmd_bench(args: argparse.Namespace) -> int:
    passes = _subset(args.passes, "--passes", corpus_benchmarks.PASSES) if args.passes else ()
    if args.ops:
        ops = _subset(args.ops, "--ops", benchmarking.OPS)
    else:
        ops = () if passes else benchmarking.OPS
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available on this machine")
    if passes:
        if not args.prompts_file:
            raise UsageError("--passes needs --prompts-file (the prompts to time the passes on)")
        existing_file(args.prompts_file, "--prompts-file")
        positive(args.prompts, "--prompts")
    apply_threads(args.threads)
    if args.out:
        check_out_file(args.out)
        with output_lock(args.out):
            return _run(args, ops, passes)
    return _run(args, ops, passes)


def _run_passes(args: argparse.Namespace, passes: tuple[str, ...], device: torch.device) -> dict[str, Any]:
    """The corpus passes on --model's encoder and --prompts-file (snce_fast.corpus_benchmarks)."""
    prompts = read_prompt_file(args.prompts_file, "--prompts-file", args.column)
    if len(prompts) < 4:
        raise UsageError(f"--prompts-file {args.prompts_file!r}: {len(prompts)} usable prompts; --passes needs >= 4")
    loaded = load_encoder(args.model, args.encoder)
    enc, tok = loaded.encoder.to(device), loaded.tokenizer
    half = prompts[: min(args.prompts, len(prompts) // 2)]
    refs = prompts[len(half):][: max(1, len(half) // 2)]
    d = enc.config.hidden_size
    sae = SAE.random(d, 4096, 32, device=device, enc_bias_std=0.05).requires_grad_(False)
    out: dict[str, Any] = {}
    if "scan" in passes:
        out["scan"] = corpus_benchmarks.time_scan(enc, tok, sae, half, 64, reps=1 if args.quick else 3)
    if "detect" in passes or "calibrate" in passes:
        gate = corpus_benchmarks.time_gate(enc, tok, sae, half, refs, 64, reps=1 if args.quick else 3)
        out.update({k: v for k, v in gate.items() if k in passes})
    if "train" in passes:
        x = corpus_benchmarks.token_rows(enc, tok, half)
        out["train"] = corpus_benchmarks.time_training(x, corpus_benchmarks.token_rows(enc, tok, refs), 4096, 32,
                                                       min(4096, max(64, len(x) // 4)), 10 if args.quick else 30)
    for name, rows in out.items():
        print(corpus_benchmarks.table(f"{name}: {loaded.name}, {args.prompts_file}", rows))
    return out


def _run(args: argparse.Namespace, ops: tuple[str, ...], passes: tuple[str, ...]) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {benchmarking.device_name(device)}  torch {torch.__version__}")
    if device.type != "cuda":
        print("CPU MODE: reduced shapes, fp32. These are CPU numbers: the fused encode/edit kernels are GPU "
              "kernels (on the CPU the reference runs for them). GPU numbers need a CUDA GPU: run "
              "`snce-fast bench` or `python benchmarks/run_all.py` there.")
    rows = benchmarking.run(ops, quick=args.quick, device=str(device), progress=not args.quiet) if ops else []
    if rows:
        print(benchmarking.table(rows))
    pass_rows = _run_passes(args, passes, device) if passes else {}
    if args.out:
        out = Path(args.out)
        atomic_write_json(out, {**benchmarking.as_json(rows, device), "passes": pass_rows})
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
    p.add_argument("--ops", default=None, help="comma-separated ops to time: encode,edit,decode,histogram "
                   "(default: all of them, unless --passes is given)")
    p.add_argument("--passes", default=None, help="comma-separated corpus passes to time on --prompts-file "
                   "against a plain Hugging Face loop (scan), without length bucketing (scan, detect, calibrate) "
                   "and against eai-sparsify and SAELens training steps (train): scan,detect,calibrate,train")
    add_model_args(p)
    p.add_argument("--prompts-file", default=None, help="prompts for --passes (.txt/.csv/.jsonl/.parquet)")
    p.add_argument("--column", default="prompt", help="prompt column of a csv/jsonl/parquet file (default prompt)")
    p.add_argument("--prompts", type=int, default=1000, help="prompts per pass (default 1000; half the file at most)")
    p.add_argument("--quick", action="store_true", help="fewer prompt counts and repetitions")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--out", default=None, help="also write the rows + device/versions/commit/date as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar over the cases")
    p.set_defaults(func=cmd_bench)

"""`snce-fast scan`: per-group histograms of SAE latent firing over prompt corpora."""
from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from snce_fast.cli._common import (
    UsageError,
    add_batching_args,
    add_model_args,
    check_max_length_arg,
    check_out_dir,
    existing_file,
    finite,
    load_encoder,
    load_sae,
    output_lock,
    positive,
    skip_summary,
    skipped_before_a_prompt,
)
from snce_fast.hooks.activations import check_max_length
from snce_fast.hooks.batching import BUCKET_WINDOW
from snce_fast.hooks.compat import check_sae_fits
from snce_fast.workflow.corpus import FORMATS
from snce_fast.workflow.scan import scan

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def parse_groups(items: list[str], column: str = "prompt") -> dict[str, list[str]]:
    """`NAME=FILE[,FILE...]` items -> {name: [files]} (files checked to exist, each group to hold a usable
    prompt, >= 2 groups)."""
    groups: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, files = item.partition("=")
        name = name.strip()
        if not sep or not name or not files.strip():
            raise UsageError(f"--group {item!r}: expected NAME=FILE[,FILE...], e.g. --group nudity=nudity.csv")
        if not _NAME_RE.match(name):
            raise UsageError(f"--group {item!r}: group name {name!r} may use only letters, digits, '_', '-' and '.'")
        if name in groups:
            raise UsageError(f"--group {item!r}: group {name!r} is given twice (names must be unique)")
        paths = [f.strip() for f in files.split(",") if f.strip()]
        for f in paths:
            existing_file(f, f"--group {name}: prompt file")
            if Path(f).suffix.lower() not in FORMATS:
                raise UsageError(f"--group {name}: prompt file {f!r} has an unsupported type: expected one of "
                                 f"{sorted(FORMATS)}")
        _require_prompts(name, paths, column)
        groups[name] = paths
    if len(groups) < 2:
        raise UsageError(f"--group: got {len(groups)} group(s): expected at least 2 (a concept and a reference), "
                         "e.g. --group nudity=nudity.csv --group coco=coco_10k.csv")
    return groups


def _require_prompts(name: str, paths: list[str], column: str) -> None:
    """A group whose files hold no usable prompt would be scanned as 0 prompts (every frequency 0): refuse
    it before any work. Each file is read only up to its first usable prompt."""
    empty = {f: skipped_before_a_prompt(f, f"--group {name}: prompt file", column) for f in paths}
    if all(counts is not None for counts in empty.values()):
        detail = "; ".join(f"{f!r} ({skip_summary(counts, column) or 'no rows'})" for f, counts in empty.items())
        raise UsageError(f"--group {name}: no usable prompts in its prompt file{'s' if len(paths) > 1 else ''} "
                         f"{detail}")


def _check_flags(args: argparse.Namespace) -> tuple[dict[str, list[str]], Path]:
    """The flags and the group files (each with a usable prompt), before anything is loaded; --out."""
    for flag, value in (("--batch-size", args.batch_size), ("--token-budget", args.token_budget),
                        ("--checkpoint-every", args.checkpoint_every), ("--window", args.window),
                        ("--max-length", args.max_length)):
        positive(value, flag)
    finite(args.threshold, "--threshold")
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint DIR (the directory an interrupted scan wrote)")
    out = check_out_dir(args.out, "a directory for the scan")
    groups = parse_groups(args.group, args.column)
    check_max_length_arg(args)
    return groups, out


def cmd_scan(args: argparse.Namespace) -> int:
    groups, out = _check_flags(args)
    with contextlib.ExitStack() as locks:
        locks.enter_context(output_lock(out))
        if args.checkpoint and Path(args.checkpoint).resolve() != out.resolve():
            locks.enter_context(output_lock(args.checkpoint))
        return _run(args, groups, out)


def _run(args: argparse.Namespace, groups: dict[str, list[str]], out: Path) -> int:
    if (out / "manifest.json").exists() and not args.overwrite:
        raise UsageError(f"--out {args.out!r} already holds a scan: pass --overwrite, or choose another directory")
    if args.checkpoint and (Path(args.checkpoint) / "manifest.json").exists() and not args.resume:
        raise UsageError(f"--checkpoint {args.checkpoint!r} holds an earlier scan's state: pass --resume to "
                         "continue it, or choose an empty directory")
    sae = load_sae(args.sae)
    loaded = load_encoder(args.model, args.encoder)
    check_sae_fits(sae, loaded.encoder, loaded.penultimate_output)
    check_max_length(loaded.encoder, loaded.tokenizer, args.max_length)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded.encoder.to(device)
    sae = sae.to(device)
    try:
        stats = scan(loaded.encoder, loaded.tokenizer, sae, groups, batch_size=args.batch_size,
                     token_budget=args.token_budget, window=args.window, checkpoint=args.checkpoint,
                     checkpoint_every=args.checkpoint_every, resume=args.resume,
                     progress=not args.quiet, threshold=args.threshold, column=args.column,
                     max_length=args.max_length, penultimate_output=loaded.penultimate_output)
    except KeyboardInterrupt:
        if args.checkpoint:
            print(f"interrupted: rerun with --resume (same --checkpoint {args.checkpoint}) to continue",
                  file=sys.stderr)
        raise
    stats.meta.update({"model": args.model, "encoder": loaded.name, "sae": str(args.sae),
                       "group_files": groups})
    stats.save(out)
    if not args.quiet:
        for i, g in enumerate(stats.groups):
            print(f"{g}: {int(stats.n_prompts[i])} prompts, {int(stats.n_tokens[i])} tokens, "
                  f"{stats.n_skipped(g)} rows skipped")
        print(f"wrote {out} ({stats.meta.get('seconds', 0):.1f} s)")
        print(f"next: snce-fast score --stats {shlex.quote(str(out))} --target {stats.groups[0]} "
              f"--reference {stats.groups[1]} --out scores/")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "scan",
        help="count how often each SAE latent fires on each prompt group (step 2)",
        description="Reads a text encoder (--model), an SAE trained on it (--sae) and two or more prompt groups "
        "(--group NAME=FILE[,FILE...]; .txt/.csv/.jsonl/.parquet), streams every prompt through the encoder "
        "and the SAE, and counts per group and latent the prompts and tokens it fires on and its summed "
        "activation. Writes --out DIR (manifest.json + a safetensors file; snce_fast.ScanStats.load reads "
        "it). With --checkpoint DIR the counts are saved every --checkpoint-every windows (--window prompts); "
        "after Ctrl-C, "
        "--resume continues and ends with the counts of an uninterrupted scan. Next step: snce-fast score.",
        epilog="example: snce-fast scan --model minilm --sae my_sae/ --group nudity=nudity.csv "
        "--group coco=coco_10k.csv --out stats/",
    )
    add_model_args(p)
    p.add_argument("--sae", required=True, help="SAE directory (config.json + sae.safetensors) trained on --model")
    p.add_argument("--group", action="append", metavar="NAME=FILE[,FILE...]",
                   help="a prompt group and its corpus file(s); repeat for each group (at least 2)")
    p.add_argument("--column", default="prompt", help="prompt column of csv/jsonl/parquet files (default prompt)")
    add_batching_args(p)
    p.add_argument("--max-length", type=int, default=None, help="tokenizer padding length (default: the "
                   "tokenizer's, 77 for CLIP; at most the encoder's positions)")
    p.add_argument("--threshold", type=float, default=0.0, help="a latent fires when its activation > this "
                   "(default 0: any top-k entry)")
    p.add_argument("--checkpoint", default=None, help="directory for resumable scan state")
    p.add_argument("--window", type=int, default=BUCKET_WINDOW, help="prompts read, sorted by length and "
                   f"checkpointed together (default {BUCKET_WINDOW})")
    p.add_argument("--checkpoint-every", type=int, default=8, help="windows between checkpoints (default 8)")
    p.add_argument("--resume", action="store_true", help="continue the scan saved in --checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--out", required=True, help="directory for the scan statistics")
    p.add_argument("--overwrite", action="store_true", help="replace a scan already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also transformers' weight loading) or "
                   "summary")
    p.set_defaults(func=cmd_scan)

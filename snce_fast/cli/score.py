"""`snce-fast score`: rank SAE latents by how specific they are to a target prompt group."""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, Optional

from snce_fast.cli._common import (
    UsageError,
    atomic_write_json,
    check_out_dir,
    existing_dir,
    load_encoder,
    load_sae,
    output_lock,
    positive,
    read_prompt_file,
)
from snce_fast.hooks.activations import check_max_length
from snce_fast.hooks.compat import check_sae_fits
from snce_fast.records.jsonfile import check_sae_hash
from snce_fast.records.scores import scores_record, top_entry
from snce_fast.sae.fingerprint import sae_hash
from snce_fast.workflow.latent_report import report, top_prompts
from snce_fast.workflow.scan_stats import ScanStats
from snce_fast.workflow.score import Scores, score

# --out gets a bar plot per listed latent up to this many (scores.json and report.md's table list them all)
MAX_PLOTS = 50


def load_stats(path: str) -> ScanStats:
    existing_dir(path, "--stats")
    try:
        return ScanStats.load(path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--stats {path!r}: {e}") from None


def _record(stats: ScanStats, scores: Scores, top: list[int], stats_path: str, level: str) -> dict[str, Any]:
    """The scores.json record (snce_fast.records.scores) of the `top` latents."""
    freq = {g: stats.frequency(g) for g in stats.groups}
    tok = {g: stats.token_frequency(g) for g in stats.groups}
    mean = {g: stats.mean_activation(g) for g in stats.groups}
    entries = [top_entry(r, j, float(scores.values[j]), {g: float(freq[g][j]) for g in stats.groups},
                         {g: float(tok[g][j]) for g in stats.groups}, {g: float(mean[g][j]) for g in stats.groups})
               for r, j in enumerate(top, 1)]
    return scores_record(method=scores.method, level=level, target=scores.target, references=scores.reference,
                         stats=str(stats_path), sae_hash=stats.meta.get("sae_hash"), n_latents=stats.n_latents,
                         n_prompts=dict(zip(stats.groups, stats.n_prompts.tolist())), top=entries)


def _check_flags(args: argparse.Namespace) -> Optional[Path]:
    """The flags on their own (the method, level and groups are checked by snce_fast.score); --out."""
    positive(args.top, "--top")
    positive(args.top_prompts, "--top-prompts")
    if bool(args.sae) != bool(args.prompts_file):
        raise UsageError("--sae and --prompts-file go together (with --model): they list each latent's top prompts")
    if args.prompts_file:
        positive(args.limit, "--limit")
    return check_out_dir(args.out, "a directory") if args.out else None


def _score(args: argparse.Namespace, stats: ScanStats) -> Scores:
    refs = args.reference or [g for g in stats.groups if g != args.target]
    try:
        return score(stats, target=args.target, reference=refs, method=args.method, level=args.level)
    except KeyError as e:  # a group the scan does not have
        raise UsageError(f"--stats {args.stats!r}: {e.args[0]}") from None


def _add_top_prompts(args: argparse.Namespace, stats: ScanStats, top: list[int],
                     record: dict[str, Any]) -> dict[int, list[tuple[float, str]]]:
    """--sae / --prompts-file: each listed latent's top prompts, added to `record`."""
    sae = load_sae(args.sae)
    check_sae_hash(stats.meta.get("sae_hash"), sae_hash(sae), f"the scan in {args.stats!r}")
    prompts = read_prompt_file(args.prompts_file, "--prompts-file", args.column, args.limit)
    if not prompts:
        raise UsageError(f"--prompts-file {args.prompts_file!r}: no usable prompts")
    loaded = load_encoder(args.model, args.encoder)
    check_sae_fits(sae, loaded.encoder, loaded.penultimate_output)
    check_max_length(loaded.encoder, loaded.tokenizer, stats.meta.get("max_length"))
    tops = top_prompts(loaded.encoder, loaded.tokenizer, sae, prompts, top, k=args.top_prompts,
                       penultimate_output=loaded.penultimate_output, max_length=stats.meta.get("max_length"))
    for entry in record["top"]:
        entry["top_prompts"] = [{"activation": v, "prompt": p} for v, p in tops[entry["latent"]]]
    record["top_prompts_source"] = str(args.prompts_file)
    return tops


def _write(out: Path, stats: ScanStats, scores: Scores, top: list[int],
           tops: Optional[dict[int, list[tuple[float, str]]]], record: dict[str, Any]) -> None:
    """--out DIR: report.md and the plots (renamed in one by one), then scores.json."""
    out.mkdir(parents=True, exist_ok=True)
    # report() writes in place: build it in a temp dir, then rename each file into --out
    with tempfile.TemporaryDirectory(prefix=".report-", dir=out) as tmp:
        report(stats, scores, tmp, neurons=top, top=tops, max_plots=MAX_PLOTS)
        fresh = {f.name for f in Path(tmp).iterdir()}
        for old in out.glob("latent_*.png"):  # plots of latents an earlier run chose
            if old.name not in fresh:
                old.unlink()
        for f in Path(tmp).iterdir():
            os.replace(f, out / f.name)
    atomic_write_json(out / "scores.json", record)


def _print(args: argparse.Namespace, groups: list[str], record: dict[str, Any]) -> None:
    print(f"{args.method} scores: {args.target} vs {', '.join(record['references'])} (strongest reference wins)")
    print(f"{'rank':>4} {'latent':>7} {'score':>9} " + " ".join(f"{'f(' + g + ')':>12}" for g in groups))
    for e in record["top"]:
        cells = " ".join(f"{e['frequency'][g]:>12.3f}" for g in groups)
        print(f"{e['rank']:>4} {e['latent']:>7} {e['score']:>9.4g} {cells}")
    for e in record["top"]:
        first = e.get("top_prompts") or []
        if first:
            print(f"latent {e['latent']} fires most on: {first[0]['prompt'][:100]!r}")
    if args.out:
        print(f"wrote scores.json, report.md and latent_*.png to {args.out}")
        print(f"next: snce-fast detect --sae SAE --scores {shlex.quote(str(Path(args.out) / 'scores.json'))} "
              "--prompts-file PROMPTS --out flags.csv   (or snce-fast erase --neurons "
              f"{record['top'][0]['latent']})")


def cmd_score(args: argparse.Namespace) -> int:
    out = _check_flags(args)
    with output_lock(out) if out is not None else contextlib.nullcontext():
        stats = load_stats(args.stats)
        sc = _score(args, stats)
        top = sc.top(min(args.top, stats.n_latents))
        record = _record(stats, sc, top, args.stats, args.level)
        tops = _add_top_prompts(args, stats, top, record) if args.sae else None
        if out is not None:
            _write(out, stats, sc, top, tops, record)
    if not args.quiet:
        _print(args, stats.groups, record)
        if out is not None and len(top) > MAX_PLOTS:
            print(f"note: plotted the first {MAX_PLOTS} of the {len(top)} latents (latent_<j>.png); scores.json "
                  "and report.md's table list all of them")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "score",
        help="rank latents by how specific they are to the target group (step 3)",
        description="Reads a scan (--stats, written by snce-fast scan), scores every latent for --target "
        "against the --reference group(s) (several: each latent gets its lowest score, so the strongest "
        "reference wins) and prints the --top N. With --out DIR writes scores.json (method, groups, top "
        "latents with scores and per-group frequencies), report.md and latent_<j>.png bar plots. With "
        "--sae, --prompts-file (and --model) it also lists the prompts each latent fires on most. "
        "Next step: snce-fast detect --scores DIR/scores.json, or snce-fast erase --neurons J.",
        epilog="example: snce-fast score --stats stats/ --target nudity --reference coco --top 5 --out scores/",
    )
    p.add_argument("--stats", required=True, help="scan directory written by snce-fast scan")
    p.add_argument("--target", required=True, help="the concept group")
    p.add_argument("--reference", action="append", help="reference group (repeatable; default: every other group)")
    p.add_argument("--method", default="snce", help="snce (default), youden, itd or saeuron")
    p.add_argument("--level", default="prompt", help="prompt (frequency = share of prompts a latent fires on; "
                   "default) or token (share of tokens; snce and youden only)")
    p.add_argument("--top", type=int, default=5, help="how many latents to list (default 5); with --out, "
                   f"scores.json lists them all but only the first {MAX_PLOTS} get a latent_<j>.png plot")
    p.add_argument("--out", default=None, help="directory for scores.json, report.md and the PNGs")
    p.add_argument("--sae", default=None, help="the scanned SAE (for the top prompts)")
    p.add_argument("--model", default="minilm", help="the scanned text encoder (for the top prompts; default minilm)")
    p.add_argument("--encoder", default="text_encoder", choices=("text_encoder", "text_encoder_2"))
    p.add_argument("--prompts-file", default=None, help="prompts to search for each latent's top prompts")
    p.add_argument("--column", default="prompt", help="prompt column of a csv/jsonl/parquet file")
    p.add_argument("--limit", type=int, default=None, help="read at most N prompts of --prompts-file")
    p.add_argument("--top-prompts", type=int, default=5, help="prompts listed per latent (default 5)")
    p.add_argument("--quiet", action="store_true", help="print nothing (no transformers progress bars either)")
    p.set_defaults(func=cmd_score)

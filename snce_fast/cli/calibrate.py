"""`snce-fast calibrate`: pick the concept latent(s) and their firing thresholds by the measured rule
(docs/identification.md): each latent's threshold flags at most 1% of generic captions and 5% of
style-matched ordinary prompts; latents ranked by target recall at that threshold."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from snce_fast.checks import check_fpr
from snce_fast.cli._common import (
    UsageError,
    add_batching_args,
    add_model_args,
    apply_threads,
    atomic_write_json,
    check_max_length_arg,
    check_out_file,
    load_encoder,
    load_sae,
    output_lock,
    positive,
    read_prompt_file,
    skip_summary,
)
from snce_fast.hooks.activations import check_max_length
from snce_fast.hooks.compat import check_sae_fits
from snce_fast.records.calibration import calibration_record, ranked_entry
from snce_fast.records.scores import read_scores, top_latents
from snce_fast.sae.fingerprint import sae_hash
from snce_fast.workflow.calibrate import DEFAULT_FPR, DEFAULT_MATCHED_FPR, Calibration, calibrate


def _groups(specs: list[str], column: str) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, files = spec.partition("=")
        name = name.strip()
        if not sep or not name or not files.strip():
            raise UsageError(f"--reference {spec!r}: expected NAME=FILE[,FILE...]")
        if name in groups:
            raise UsageError(f"--reference {spec!r}: group {name!r} is given twice")
        prompts: list[str] = []
        skipped: dict[str, int] = {}
        for f in [f.strip() for f in files.split(",") if f.strip()]:
            prompts += read_prompt_file(f, f"--reference {name}", column, skipped=skipped)
        if not prompts:
            raise UsageError(f"--reference {spec!r}: no usable prompts ({skip_summary(skipped, column) or 'no rows'})")
        groups[name] = prompts
    return groups


def _fprs(specs: list[str], groups: dict[str, list[str]]) -> Any:
    if not specs:
        return None  # the measured default: 1% for the first group, 5% for the others
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = None
        if not sep or name not in groups or rate is None:
            raise UsageError(f"--fpr {spec!r}: expected GROUP=RATE with GROUP one of {list(groups)} and 0 <= RATE < 1")
        out[name] = check_fpr(rate, f"--fpr {name}")
    return {g: out.get(g, DEFAULT_FPR if i == 0 else DEFAULT_MATCHED_FPR) for i, g in enumerate(groups)}


def _candidates(args: argparse.Namespace, sae: Any) -> Optional[list[int]]:
    """--candidates: the top --shortlist latents of a scores.json made with `sae` (None: every latent)."""
    if not args.candidates:
        return None
    positive(args.shortlist, "--shortlist")
    return top_latents(read_scores(args.candidates, sae_hash(sae), sae.n_latents), args.shortlist)


def _record(args: argparse.Namespace, cal: Calibration, chosen: list[int], groups: dict[str, list[str]],
            sae: Any, penultimate_output: bool) -> dict[str, Any]:
    """The calibration.json record (snce_fast.records.calibration)."""
    pos = {j: i for i, j in enumerate(cal.neurons)}
    ranked = [ranked_entry(j, float(cal.thresholds[pos[j]]), float(cal.recall[pos[j]]),
                           {g: float(r[pos[j]]) for g, r in cal.reference_rates.items()})
              for j in cal.neurons[: max(args.report, args.top)]]
    return calibration_record(
        sae=str(args.sae), sae_hash=sae_hash(sae), model=args.model, encoder=args.encoder,
        penultimate_output=penultimate_output, target=str(args.target),
        references={g: len(p) for g, p in groups.items()}, fpr=cal.fpr, min_tokens=cal.min_tokens,
        max_length=args.max_length, neurons=chosen, thresholds=cal.thresholds_for(chosen),
        gate_threshold=cal.threshold(chosen), ranked=ranked)


def _check_flags(args: argparse.Namespace) -> Path:
    """The flags on their own, before any file is read; the --out path."""
    for flag, value in (("--top", args.top), ("--min-tokens", args.min_tokens), ("--batch-size", args.batch_size),
                        ("--token-budget", args.token_budget), ("--max-length", args.max_length),
                        ("--shortlist", args.shortlist)):
        positive(value, flag)
    apply_threads(args.threads)
    out = check_out_file(args.out)
    if out.suffix.lower() != ".json":
        raise UsageError(f"--out {args.out!r}: expected a .json file name")
    if not args.reference:
        raise UsageError("give at least one --reference NAME=FILE (generic captions first, then style-matched "
                         "ordinary prompts)")
    check_max_length_arg(args)
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    out = _check_flags(args)
    with output_lock(out):
        return _run(args, out)


def _run(args: argparse.Namespace, out: Path) -> int:
    skipped: dict[str, int] = {}
    target = read_prompt_file(args.target, "--target", args.column, skipped=skipped)
    if not target:
        raise UsageError(f"--target {args.target!r}: no usable prompts "
                         f"({skip_summary(skipped, args.column) or 'no rows'})")
    groups = _groups(args.reference, args.column)
    fpr = _fprs(args.fpr or [], groups)
    sae = load_sae(args.sae)
    candidates = _candidates(args, sae)
    loaded = load_encoder(args.model, args.encoder)
    check_sae_fits(sae, loaded.encoder, loaded.penultimate_output)
    check_max_length(loaded.encoder, loaded.tokenizer, args.max_length)
    cal = calibrate(loaded.encoder, sae, candidates, target, groups, fpr=fpr, min_tokens=args.min_tokens,
                    tokenizer=loaded.tokenizer, batch_size=args.batch_size, token_budget=args.token_budget,
                    max_length=args.max_length, penultimate_output=loaded.penultimate_output, progress=not args.quiet)
    chosen = cal.top(args.top)
    record = _record(args, cal, chosen, groups, sae, loaded.penultimate_output)
    pos = {j: i for i, j in enumerate(cal.neurons)}
    for j in chosen:
        i = pos[j]
        rates = ", ".join(f"{g} {float(r[i]):.1%}" for g, r in cal.reference_rates.items())
        print(f"latent {j}: threshold {float(cal.thresholds[i]):.4g}, flags {float(cal.recall[i]):.1%} of the "
              f"target prompts and {rates} of the references (calibration prompts)")
    atomic_write_json(out, record)
    print(f"wrote {out}; next: snce-fast detect --sae {args.sae} --calibration {out} --prompts-file ... or "
          f"snce-fast erase ... --calibration {out}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate", help="pick the concept latent(s) and firing thresholds on reference prompts (step 3b)",
        description="The measured best identification rule (docs/identification.md): every latent (or a "
        "--candidates shortlist from snce-fast score) gets the firing threshold at which it flags at most 1% "
        "of the first reference group (generic captions, e.g. COCO) and 5% of every further group "
        "(style-matched ordinary prompts: same artistic style, no concept); latents are ranked by the share of "
        "--target prompts they flag at that threshold minus the largest reference share; --top N picks N "
        "greedily. Use prompts not used for scanning. Writes calibration.json (neurons, per-neuron "
        "thresholds, the gate threshold); next: snce-fast detect / erase / eval --calibration FILE.",
    )
    add_model_args(p)
    p.add_argument("--sae", required=True, help="SAE directory trained on --model")
    p.add_argument("--target", required=True, help="concept prompts (.txt/.csv/.jsonl/.parquet)")
    p.add_argument("--reference", action="append", metavar="NAME=FILE[,FILE...]",
                   help="a reference group (repeatable): generic captions first, then style-matched ordinary prompts")
    p.add_argument("--fpr", action="append", metavar="GROUP=RATE",
                   help="override a group's calibration rate (default 0.01 for the first group, 0.05 for the others)")
    p.add_argument("--candidates", default=None, help="a scores.json from snce-fast score: calibrate only its "
                   "top --shortlist latents (default: every latent)")
    p.add_argument("--shortlist", type=int, default=1024, help="how many of --candidates' latents (default 1024)")
    p.add_argument("--top", type=int, default=1, help="latents to choose (default 1)")
    p.add_argument("--report", type=int, default=20, help="ranked latents to list in the output (default 20)")
    p.add_argument("--min-tokens", type=int, default=1, help="counted tokens a latent must fire on to flag a "
                   "prompt (default 1)")
    p.add_argument("--column", default="prompt", help="prompt column of csv/jsonl/parquet files")
    add_batching_args(p)
    p.add_argument("--max-length", type=int, default=None, help="pad prompts to this many tokens (default: the "
                   "tokenizer's limit, as pipelines do)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--out", required=True, help="calibration .json file to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars (transformers' weight loading); the "
                   "chosen latents are still printed")
    p.set_defaults(func=cmd_calibrate)

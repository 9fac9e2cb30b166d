"""`snce-fast detect`: the gate as a zero-shot classifier: flag prompts on which a concept latent fires."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

from snce_fast.checks import check_fpr
from snce_fast.cli._common import (
    UsageError,
    add_batching_args,
    add_model_args,
    add_prompt_file_args,
    atomic_write_text,
    check_max_length_arg,
    check_neurons,
    check_out_file,
    load_encoder,
    load_sae,
    output_lock,
    parse_neurons,
    positive,
    read_prompt_file,
    read_prompts_arg,
    skip_summary,
)
from snce_fast.hooks.activations import check_max_length
from snce_fast.hooks.compat import check_sae_fits
from snce_fast.ops.reference import target_threshold_values
from snce_fast.records.calibration import read_calibration
from snce_fast.records.scores import read_scores, top_latents
from snce_fast.sae.fingerprint import sae_hash
from snce_fast.workflow.corpus import read_labels
from snce_fast.workflow.detect import detect, prompt_activations
from snce_fast.workflow.score import threshold_at_fpr

OUT_TYPES = (".csv", ".jsonl")


def _neurons_from_scores(path: str, top: int, sae: Any) -> list[int]:
    """The `top` best latents of a scores.json written by `snce-fast score` (checked against `sae`)."""
    record = read_scores(path, sae_hash(sae), sae.n_latents)
    if top > len(record["top"]):
        raise UsageError(f"--top {top}: {path} lists only {len(record['top'])} latents "
                         "(rerun score with a larger --top)")
    return top_latents(record, top)


def parse_thresholds(text: str, neurons: list[int]) -> Any:
    """--threshold: one float for every neuron, or one per neuron (comma-separated, in --neurons order)."""
    try:
        values = [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--threshold {text!r}: expected a number, or one number per neuron "
                         "(comma-separated)") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--threshold {text!r}: expected finite numbers")
    if len(values) == 1:
        return values[0]
    try:
        return target_threshold_values(values, neurons, neurons)  # one per neuron, as detect() checks them
    except ValueError as e:
        raise UsageError(f"--threshold {text!r}: {e}") from None


def _rows_text(path: Path, prompts: list[str], det: Any, labels: Optional[list[Optional[bool]]]) -> str:
    rows = [{"prompt": p, "flag": bool(f), "score": round(float(s), 6), "tokens": int(t)}
            for p, f, s, t in zip(prompts, det.flags.tolist(), det.scores.tolist(), det.tokens.tolist())]
    if labels is not None:
        for r, lab in zip(rows, labels):
            r["label"] = lab
    if path.suffix.lower() == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["prompt", "flag", "score", "tokens"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _check_flags(args: argparse.Namespace) -> Optional[Path]:
    """The flags on their own, before anything is loaded; the --out path."""
    for flag, value in (("--min-tokens", args.min_tokens), ("--max-length", args.max_length),
                        ("--batch-size", args.batch_size), ("--token-budget", args.token_budget)):
        positive(value, flag)
    if args.top < 1:
        raise UsageError(f"--top {args.top}: expected a positive number of latents")
    if sum(bool(x) for x in (args.neurons, args.scores, args.calibration)) != 1:
        raise UsageError("give exactly one of --neurons J[,J...], --scores scores.json and "
                         "--calibration calibration.json")
    if args.calibration and (args.threshold is not None or args.calibrate_on):
        raise UsageError("--calibration already holds the thresholds: drop --threshold / --calibrate-on")
    if args.calibrate_on and args.threshold is not None:
        raise UsageError("give --threshold or --calibrate-on (thresholds calibrated on reference prompts), not both")
    if args.calibrate_on:
        check_fpr(args.fpr, "--fpr")
    out = check_out_file(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in OUT_TYPES:
        raise UsageError(f"--out {args.out!r}: expected a .csv or .jsonl file name")
    if args.label_column and not args.prompts_file:
        raise UsageError("--label-column needs --prompts-file (a .csv or .jsonl with that column)")
    check_max_length_arg(args)
    return out


def _targets(args: argparse.Namespace, sae: Any) -> tuple[list[int], Any]:
    """The neurons and threshold(s) from --neurons / --scores / --calibration and --threshold; a
    calibration file also sets --min-tokens (and --max-length unless given)."""
    if args.calibration:
        record = read_calibration(args.calibration, sae_hash(sae), sae.n_latents)
        args.min_tokens = record["min_tokens"]
        if args.max_length is None:
            args.max_length = record["max_length"]
        return record["neurons"], [float(t) for t in record["thresholds"]]
    if args.neurons:
        neurons = check_neurons(parse_neurons(args.neurons), sae.n_latents)
    else:
        neurons = _neurons_from_scores(args.scores, args.top, sae)
    return neurons, parse_thresholds(args.threshold, neurons) if args.threshold is not None else 0.0


def _calibration_prompts(args: argparse.Namespace, skipped: dict[str, int]) -> list[str]:
    """The --calibrate-on reference prompts (none without the flag); skipped rows counted into `skipped`."""
    prompts: list[str] = []
    if args.calibrate_on:
        for f in [f.strip() for f in args.calibrate_on.split(",") if f.strip()]:
            prompts += read_prompt_file(f, "--calibrate-on", args.column, skipped=skipped)
        if not prompts:
            raise UsageError(f"--calibrate-on {args.calibrate_on!r}: no usable reference prompts"
                             + (f" ({skip_summary(skipped, args.column)})" if skipped else ""))
    return prompts


def _labels(args: argparse.Namespace, prompts: list[str]) -> Optional[list[Optional[bool]]]:
    """--label-column: one label per prompt (None for the inline --prompt ones and blank labels)."""
    if not args.label_column:
        return None
    labels = read_labels(args.prompts_file, args.label_column, args.column)
    n_inline = len(args.prompt or [])
    labels = [None] * n_inline + labels
    if len(labels) != len(prompts):
        raise UsageError(f"--label-column {args.label_column!r}: {len(labels) - n_inline} labels for "
                         f"{len(prompts) - n_inline} prompts in {args.prompts_file}")
    return labels


def _calibrate(args: argparse.Namespace, loaded: Any, sae: Any, neurons: list[int], prompts: list[str],
               skipped: dict[str, int]) -> list[float]:
    """Per-neuron thresholds that flag at most --fpr of the --calibrate-on prompts."""
    acts = prompt_activations(loaded.encoder, sae, neurons, prompts, tokenizer=loaded.tokenizer,
                              min_tokens=args.min_tokens, batch_size=args.batch_size,
                              token_budget=args.token_budget, max_length=args.max_length,
                              penultimate_output=loaded.penultimate_output,
                              progress=None if args.quiet else "calibrate (references)")
    threshold = [float(t) for t in threshold_at_fpr(acts, args.fpr)]
    dropped = skip_summary(skipped, args.column)
    print(f"calibrated on {len(prompts)} reference prompts{f' ({dropped})' if dropped else ''} at fpr {args.fpr:g}: "
          "thresholds " + ", ".join(f"{j}: {t:.4g}" for j, t in zip(neurons, threshold)))
    return threshold


def _print_summary(args: argparse.Namespace, det: Any, n_prompts: int, neurons: list[int], threshold: Any,
                   labels: Optional[list[Optional[bool]]], skipped: dict[str, int]) -> None:
    n_flag = int(det.flags.sum())
    dropped = skip_summary(skipped, args.column)
    print(f"flagged {n_flag} of {n_prompts} prompts ({n_flag / max(n_prompts, 1):.1%}"
          + (f"; {dropped} in {args.prompts_file}" if dropped else "") + ") with latent(s) "
          f"{','.join(map(str, neurons))}, min_tokens {args.min_tokens}, threshold "
          + (f"{threshold:g}" if isinstance(threshold, float) else ",".join(f"{t:.4g}" for t in threshold)))
    if labels is not None:
        pairs = [(bool(f), lab) for f, lab in zip(det.flags.tolist(), labels) if lab is not None]
        pos = [f for f, lab in pairs if lab]
        neg = [f for f, lab in pairs if not lab]
        tpr = sum(pos) / len(pos) if pos else float("nan")
        fpr = sum(neg) / len(neg) if neg else float("nan")
        print(f"labels ({args.label_column}): TPR {tpr:.3f} ({sum(pos)} of {len(pos)} positives), "
              f"FPR {fpr:.3f} ({sum(neg)} of {len(neg)} negatives)")


def cmd_detect(args: argparse.Namespace) -> int:
    out = _check_flags(args)
    with output_lock(out) if out is not None else contextlib.nullcontext():
        return _run(args, out)


def _run(args: argparse.Namespace, out: Optional[Path]) -> int:
    sae = load_sae(args.sae)
    neurons, threshold = _targets(args, sae)
    calibration_skipped: dict[str, int] = {}
    calibration_prompts = _calibration_prompts(args, calibration_skipped)
    skipped: dict[str, int] = {}
    prompts = read_prompts_arg(args, skipped)
    labels = _labels(args, prompts)
    loaded = load_encoder(args.model, args.encoder)
    check_sae_fits(sae, loaded.encoder, loaded.penultimate_output)
    check_max_length(loaded.encoder, loaded.tokenizer, args.max_length)
    if calibration_prompts:
        threshold = _calibrate(args, loaded, sae, neurons, calibration_prompts, calibration_skipped)
    # SDXL pipelines read hidden_states[-2]: penultimate_output reads the bare encoder the same way
    det = detect(loaded.encoder, sae, neurons, prompts, tokenizer=loaded.tokenizer, min_tokens=args.min_tokens,
                 threshold=threshold, batch_size=args.batch_size, token_budget=args.token_budget,
                 progress=not args.quiet,
                 max_length=args.max_length, penultimate_output=loaded.penultimate_output)
    if out is not None:
        atomic_write_text(out, _rows_text(out, prompts, det, labels))
    _print_summary(args, det, len(prompts), neurons, threshold, labels, skipped)
    if out is not None:
        print(f"wrote {out}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "detect",
        help="flag prompts on which the concept latent(s) fire: a zero-shot classifier (step 4)",
        description="Reads a text encoder (--model: minilm, a transformers model dir, or a diffusers pipeline dir "
        "with --encoder), its SAE (--sae), the concept latent(s) (--neurons, or the --top best of a "
        "scores.json from snce-fast score) and prompts (--prompt / --prompts-file). A prompt is flagged when "
        "a target latent's activation exceeds --threshold on at least --min-tokens counted tokens: the same "
        "test as erase --gate. Prints 'flagged X of Y'; --out FILE (.csv or .jsonl) writes prompt, flag, "
        "score (max target activation) and tokens (counted tokens that fired) per prompt. --label-column "
        "adds TPR / FPR against a 0/1 column of the prompts file. --calibrate-on FILE sets per-neuron thresholds "
        "so that each flags at most --fpr of those reference prompts (snce_fast.prompt_activations + "
        "threshold_at_fpr). Next step: snce-fast erase.",
        epilog="example: snce-fast detect --sae my_sae/ --scores scores/scores.json --prompts-file heldout.csv "
        "--out flags.csv",
    )
    add_model_args(p)
    p.add_argument("--sae", required=True, help="SAE directory trained on --model")
    p.add_argument("--neurons", default=None, help="latent indices, comma-separated")
    p.add_argument("--scores", default=None, help="scores.json from snce-fast score (instead of --neurons)")
    p.add_argument("--top", type=int, default=1, help="with --scores: use its N best latents (default 1)")
    p.add_argument("--calibration", default=None, help="calibration.json from snce-fast calibrate: its neurons, "
                   "per-neuron thresholds and min_tokens (the measured best rule; instead of --neurons)")
    add_prompt_file_args(p)
    p.add_argument("--label-column", default=None, help="0/1 column of a csv/jsonl --prompts-file: report TPR/FPR")
    p.add_argument("--min-tokens", type=int, default=1, help="counted tokens a target must fire on (default 1)")
    p.add_argument("--threshold", default=None, help="activation a target must exceed (default 0): one number, or "
                   "one per neuron, comma-separated")
    p.add_argument("--calibrate-on", default=None, metavar="FILE[,FILE...]", help="ordinary (non-concept) reference "
                   "prompts: set each neuron's threshold so it flags at most --fpr of them (use prompts other than "
                   "those being classified)")
    p.add_argument("--fpr", type=float, default=0.01, help="with --calibrate-on: the reference false-positive rate "
                   "to allow per neuron (default 0.01)")
    add_batching_args(p)
    p.add_argument("--max-length", type=int, default=None, help="tokenizer padding length (default: the "
                   "tokenizer's; counted tokens never include padding, so a shorter pad only saves time)")
    p.add_argument("--out", default=None, help="per-prompt results: a .csv or .jsonl file")
    p.add_argument("--quiet", action="store_true", help="no progress bars (transformers' weight loading); the "
                   "summary is still printed")
    p.set_defaults(func=cmd_detect)

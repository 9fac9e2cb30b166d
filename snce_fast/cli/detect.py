"""`snce-fast detect`: the gate as a zero-shot classifier: flag prompts on which a concept latent fires."""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

from snce_fast.cli._common import (UsageError, add_model_args, add_prompt_file_args, atomic_write_text, check_neurons,
                      check_out_file, check_same_sae, load_encoder, load_sae, parse_neurons, positive, read_prompt_file,
                      read_prompts_arg, read_record)

OUT_TYPES = (".csv", ".jsonl")


def neurons_from_scores(path: str, top: int) -> tuple[list[int], dict[str, Any]]:
    """The `top` best latents of a scores.json written by `snce-fast score`, and the file's record."""
    record = read_record(path, "--scores", "snce_fast.scores", "snce-fast score", "top")
    if top > len(record["top"]):
        raise UsageError(f"--top {top}: {path} lists only {len(record['top'])} latents (rerun score with a larger --top)")
    return [int(e["latent"]) for e in record["top"][:top]], record


def read_labels(path: str, column: str, prompt_column: str = "prompt") -> list[Optional[bool]]:
    """Per usable prompt of a csv/jsonl file (the rows the corpus reader keeps: blank and undecodable
    prompts skipped), its label as a bool (1/0, true/false, yes/no), or None when the label is blank."""
    from snce_fast.workflow.corpus import PromptFile, _check

    pf = PromptFile(path, prompt_column)
    truthy, falsy = {"1", "true", "yes", "y", "t"}, {"0", "false", "no", "n", "f"}

    def usable(text: Any) -> bool:
        return isinstance(text, str) and _check(text, 0).skip is None

    def as_bool(v: Any, i: int) -> Optional[bool]:
        s = "" if v is None else str(v).strip().lower()
        if not s:
            return None  # unlabelled: left out of the rates
        try:
            return float(s) > 0
        except ValueError:
            pass
        if s in truthy or s in falsy:
            return s in truthy
        raise UsageError(f"--label-column {column!r}: row {i + 1} has {v!r}: expected 1/0, true/false or yes/no")

    labels: list[Optional[bool]] = []
    if pf.format == "csv":
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            fields = [h.lstrip("\ufeff").strip() for h in (reader.fieldnames or [])]
            if column not in fields:
                raise UsageError(f"--label-column {column!r}: no such column in {path}; columns found: {fields}")
            reader.fieldnames = fields
            for i, row in enumerate(reader):
                if usable(row.get(prompt_column)):
                    labels.append(as_bool(row[column], i))
    elif pf.format == "jsonl":
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for i, line in enumerate(f):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and usable(obj.get(prompt_column)):
                    if column not in obj:
                        raise UsageError(f"--label-column {column!r}: row {i + 1} of {path} has no such field")
                    labels.append(as_bool(obj[column], i))
    else:
        raise UsageError(f"--label-column needs a .csv or .jsonl --prompts-file, got {path!r}")
    return labels


def parse_thresholds(text: str, neurons: list[int]) -> Any:
    """--threshold: one float for every neuron, or one per neuron (comma-separated, in --neurons order)."""
    try:
        values = [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--threshold {text!r}: expected a number, or one number per neuron (comma-separated)") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--threshold {text!r}: expected finite numbers")
    if len(values) == 1:
        return values[0]
    if len(values) != len(neurons):
        raise UsageError(f"--threshold {text!r}: {len(values)} values for {len(neurons)} neuron(s) "
                         f"{','.join(map(str, neurons))}: expected one value, or one per neuron")
    return values


def _rows_text(path: Path, prompts: list[str], det: Any, labels: Optional[list[Optional[bool]]]) -> str:
    rows = [{"prompt": p, "flag": bool(f), "score": round(float(s), 6), "tokens": int(t)}
            for p, f, s, t in zip(prompts, det.flags.tolist(), det.scores.tolist(), det.tokens.tolist())]
    if labels is not None:
        for r, lab in zip(rows, labels):
            r["label"] = lab
    if path.suffix.lower() == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["prompt", "flag", "score", "tokens"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def cmd_detect(args: argparse.Namespace) -> int:
    from snce_fast.workflow.detect import detect

    for flag, value in (("--min-tokens", args.min_tokens), ("--max-length", args.max_length),
                        ("--batch-size", args.batch_size)):
        positive(value, flag)
    if args.top < 1:
        raise UsageError(f"--top {args.top}: expected a positive number of latents")
    if sum(bool(x) for x in (args.neurons, args.scores, args.calibration)) != 1:
        raise UsageError("give exactly one of --neurons J[,J...], --scores scores.json and --calibration calibration.json")
    if args.calibration and (args.threshold is not None or args.calibrate_on):
        raise UsageError("--calibration already holds the thresholds: drop --threshold / --calibrate-on")
    out = check_out_file(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in OUT_TYPES:
        raise UsageError(f"--out {args.out!r}: expected a .csv or .jsonl file name")
    if args.label_column and not args.prompts_file:
        raise UsageError("--label-column needs --prompts-file (a .csv or .jsonl with that column)")
    sae = load_sae(args.sae)
    calibrated = None
    if args.calibration:
        from snce_fast.cli.calibrate import read_calibration

        calibrated = read_calibration(args.calibration, sae)
        neurons = [int(j) for j in calibrated["neurons"]]
        args.min_tokens = int(calibrated.get("min_tokens", 1))
        if args.max_length is None:
            args.max_length = calibrated.get("max_length")
    elif args.neurons:
        neurons = parse_neurons(args.neurons)
    else:
        neurons, record = neurons_from_scores(args.scores, args.top)
        if record.get("n_latents") not in (None, sae.n_latents):
            raise UsageError(f"--scores {args.scores!r} was computed for an SAE with {record['n_latents']} latents, "
                             f"but --sae has {sae.n_latents}")
        check_same_sae(sae, record.get("sae_hash"), f"--scores {args.scores!r}")
    check_neurons(neurons, sae.n_latents)
    neurons = list(dict.fromkeys(neurons))
    if args.calibrate_on and args.threshold is not None:
        raise UsageError("give --threshold or --calibrate-on (thresholds calibrated on reference prompts), not both")
    threshold = parse_thresholds(args.threshold, neurons) if args.threshold is not None else 0.0
    if calibrated is not None:
        threshold = [float(t) for t in calibrated["thresholds"]]
    calibration_prompts: list[str] = []
    if args.calibrate_on:
        if not 0.0 <= args.fpr < 1.0:
            raise UsageError(f"--fpr {args.fpr}: expected a false-positive rate with 0 <= fpr < 1")
        for f in [f.strip() for f in args.calibrate_on.split(",") if f.strip()]:
            calibration_prompts += read_prompt_file(f, "--calibrate-on", args.column)
        if not calibration_prompts:
            raise UsageError(f"--calibrate-on {args.calibrate_on!r}: no usable reference prompts")
    prompts = read_prompts_arg(args)
    labels = None
    if args.label_column:
        labels = read_labels(args.prompts_file, args.label_column, args.column)
        n_inline = len(args.prompt or [])
        labels = [None] * n_inline + labels
        if len(labels) != len(prompts):
            raise UsageError(f"--label-column {args.label_column!r}: {len(labels) - n_inline} labels for "
                             f"{len(prompts) - n_inline} prompts in {args.prompts_file}")
    loaded = load_encoder(args.model, args.encoder)
    from snce_fast.cli.scan import check_sae_fits

    check_sae_fits(sae, loaded.encoder, args.model, loaded.penultimate_output)
    if calibration_prompts:
        from snce_fast.workflow.detect import prompt_activations
        from snce_fast.workflow.score import threshold_at_fpr

        acts = prompt_activations(loaded.encoder, sae, neurons, calibration_prompts, tokenizer=loaded.tokenizer,
                                  min_tokens=args.min_tokens, batch_size=args.batch_size, max_length=args.max_length,
                                  penultimate_output=loaded.penultimate_output)
        threshold = [float(t) for t in threshold_at_fpr(acts, args.fpr)]
        print(f"calibrated on {len(calibration_prompts)} reference prompts at fpr {args.fpr:g}: thresholds "
              + ", ".join(f"{j}: {t:.4g}" for j, t in zip(neurons, threshold)))
    # SDXL pipelines read hidden_states[-2]: penultimate_output reads the bare encoder the same way
    det = detect(loaded.encoder, sae, neurons, prompts, tokenizer=loaded.tokenizer, min_tokens=args.min_tokens,
                 threshold=threshold, batch_size=args.batch_size, max_length=args.max_length,
                 penultimate_output=loaded.penultimate_output)

    if out is not None:
        atomic_write_text(out, _rows_text(out, prompts, det, labels))
    n_flag = int(det.flags.sum())
    print(f"flagged {n_flag} of {len(prompts)} prompts ({n_flag / max(len(prompts), 1):.1%}) with latent(s) "
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
    p.add_argument("--batch-size", type=int, default=64, help="prompts per encoder call")
    p.add_argument("--max-length", type=int, default=None, help="tokenizer padding length (default: the "
                   "tokenizer's; counted tokens never include padding, so a shorter pad only saves time)")
    p.add_argument("--out", default=None, help="per-prompt results: a .csv or .jsonl file")
    p.set_defaults(func=cmd_detect)

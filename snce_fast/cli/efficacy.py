"""`snce-fast efficacy`: does the edit erase? Concept survival, information left, collateral and pair
cosines at the embedding level (snce_fast.evaluation.efficacy, docs/efficacy.md)."""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from snce_fast.cli._common import (
    UsageError,
    add_batching_args,
    add_edit_args,
    add_model_args,
    apply_calibration,
    atomic_write_json,
    check_edit_options,
    check_max_length_arg,
    check_neurons,
    check_out_file,
    edit_options,
    finite,
    load_encoder,
    load_sae,
    output_lock,
    parse_neurons,
    positive,
    read_pair_file,
    read_required_prompts,
)
from snce_fast.hooks.activations import check_max_length

BASELINES = ("leace", "leace-gated")


def split(prompts: list[str], fraction: float, seed: int, what: str) -> tuple[list[str], list[str]]:
    """(reader-training part, measured part) of a prompt file: a seeded shuffle, `fraction` to training."""
    prompts = list(dict.fromkeys(prompts))
    if len(prompts) < 2:
        raise UsageError(f"{what}: {len(prompts)} distinct prompt(s); expected at least 2 (one to fit the reader, "
                         "one to measure)")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    n = min(max(1, round(fraction * len(order))), len(order) - 1)
    return order[:n], order[n:]


def _split_file(args: argparse.Namespace, path: str, flag: str) -> tuple[list[str], list[str]]:
    """`split` of one prompt-file flag's prompts (at least 2 needed: one fits the reader, one is measured)."""
    return split(read_required_prompts(path, flag, args.column, "at least 2"), args.train_fraction, args.seed, flag)


def _check_flags(args: argparse.Namespace) -> Path:
    for flag, value in (("--max-length", args.max_length), ("--batch-size", args.batch_size),
                        ("--token-budget", args.token_budget)):
        positive(value, flag)
    finite(args.fpr, "--fpr")
    if not 0.0 <= args.fpr < 1.0:
        raise UsageError(f"--fpr {args.fpr}: expected a rate with 0 <= fpr < 1")
    if not 0.0 < args.train_fraction < 1.0:
        raise UsageError(f"--train-fraction {args.train_fraction}: expected 0 < fraction < 1")
    bad = [b for b in args.baselines if b not in BASELINES]
    if bad:
        raise UsageError(f"--baselines {bad[0]!r}: expected a comma-separated subset of {', '.join(BASELINES)}")
    out = check_out_file(args.out)
    if out.suffix.lower() != ".json":
        raise UsageError(f"--out {args.out!r}: expected a .json file name")
    check_max_length_arg(args)
    return out


def _edits(args: argparse.Namespace, sae: Any, neurons: list[int]) -> dict[str, Any]:
    from snce_fast.evaluation import efficacy

    opts = edit_options(args)
    label = "edit: " + ",".join(map(str, neurons)) + (f" clamp {opts['clamp']:g}" if opts["clamp"] is not None
                                                       else f" scale {opts['scale']:g}") + f" {opts['mode']}" \
        + (" gated" if opts["gate"] else "")
    edits = {"no edit": efficacy.no_edit(), label: efficacy.snce_edit(sae, neurons, **opts)}
    try:
        if "leace" in args.baselines:
            edits["LEACE"] = efficacy.leace_edit()
        if "leace-gated" in args.baselines:
            edits["LEACE gated"] = efficacy.leace_edit(gate=(sae, neurons, opts["threshold"], opts["min_tokens"]))
    except ImportError as e:
        raise UsageError(f"--baselines: {e}") from None
    return edits


def _print(result: Any) -> None:
    print(f"reader threshold {result.reader_threshold:.4g} (fixed at {result.reader_fpr:g} FPR before any edit)")
    print(f"{'edit':40s} {'survival':>8s} {'AUC(re)':>8s} {'gen chg':>8s} {'gen flag':>13s} {'match chg':>9s} {'pair cos':>13s}")
    for name, r in result.reports.items():
        g, m, p = r["generic"], r.get("matched"), r.get("pairs")
        surv = "n/a" if r["survival"] is None else f"{r['survival']:.1%}"
        auc = "n/a" if r["retrained_auc"] is None else f"{r['retrained_auc']:.3f}"
        print(f"{name[:40]:40s} {surv:>8s} {auc:>8s} {g['changed']:>8.1%} "
              f"{g['flag_before']:>5.1%}->{g['flag_after']:<6.1%} {'' if m is None else format(m['changed'], '.1%'):>9s} "
              + ("" if p is None else f"{p['cos_before']:.3f}->{p['cos_after']:.3f}"))


def cmd_efficacy(args: argparse.Namespace) -> int:
    args.baselines = [b.strip() for b in (args.baselines or "").split(",") if b.strip()]
    out = _check_flags(args)
    with output_lock(out):
        return _run(args, out)


def _run(args: argparse.Namespace, out: Path) -> int:
    from snce_fast.evaluation.efficacy import PromptSets, measure_erasure

    sae = load_sae(args.sae)
    apply_calibration(args, sae)
    check_edit_options(args)
    neurons = check_neurons(parse_neurons(args.neurons), sae.n_latents)
    c_train, c_test = _split_file(args, args.concept, "--concept")
    o_train, o_test = _split_file(args, args.ordinary, "--ordinary")
    m_train, m_test = _split_file(args, args.matched, "--matched") if args.matched else ([], [])
    pairs = read_pair_file(args.pairs) if args.pairs else []
    edits = _edits(args, sae, neurons)
    loaded = load_encoder(args.model, args.encoder)
    check_max_length(loaded.encoder, loaded.tokenizer, args.max_length)
    sets = PromptSets(c_train, o_train + m_train, c_test, o_test, m_test, pairs)
    result = measure_erasure(loaded.encoder, sets, edits, tokenizer=loaded.tokenizer, fpr=args.fpr,
                             max_length=args.max_length, batch_size=args.batch_size, token_budget=args.token_budget,
                             penultimate_output=loaded.penultimate_output, progress=not args.quiet)
    record = {"model": args.model, "sae": args.sae, "neurons": neurons, "edit": edit_options(args),
              "reader": {"fpr": result.reader_fpr, "threshold": result.reader_threshold,
                         "pooling": "mean over counted tokens (1..EOS) of the encoder output"},
              "split": {"train_fraction": args.train_fraction, "seed": args.seed,
                        "sizes": {"concept_train": len(c_train), "ordinary_train": len(o_train) + len(m_train),
                                  "concept_test": len(c_test), "generic_test": len(o_test),
                                  "matched_test": len(m_test), "pairs": len(pairs)}},
              "reports": result.reports}
    atomic_write_json(out, record)
    _print(result)
    print(f"wrote {out}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "efficacy",
        help="does the edit erase? concept survival, information left and collateral at the embedding level",
        description="Measures an edit (--neurons / --calibration and the erase options) on the encoder's output "
        "embeddings. Each prompt file is split (--train-fraction, --seed) into a part that fits the readers and a "
        "measured part. A linear reader trained on unedited mean-pooled embeddings (concept vs ordinary), its "
        "threshold fixed at --fpr on ordinary prompts before any edit, gives the survival (share of measured "
        "concept prompts it flags that it still flags after the edit); a reader retrained on edited embeddings "
        "gives the AUC left (0.5 = linearly erased); collateral = share of --ordinary / --matched prompts whose "
        "embedding changes at all; --pairs adds concept/neutral cosines. --baselines leace,leace-gated adds "
        "EleutherAI's LEACE (pip install 'snce_fast[efficacy]'). Writes --out (JSON) and prints a table.",
        epilog="example: snce-fast efficacy --sae my_sae/ --calibration calibration.json --concept nudity.csv "
        "--ordinary coco.csv --matched i2p_clean.csv --pairs pairs.csv --baselines leace --out efficacy.json",
    )
    add_model_args(p)
    p.add_argument("--sae", required=True, help="SAE directory trained on --model (hook 'output')")
    add_edit_args(p)
    p.add_argument("--concept", required=True, help="concept prompts (.txt/.csv/.jsonl/.parquet)")
    p.add_argument("--ordinary", required=True, help="generic ordinary prompts, e.g. captions")
    p.add_argument("--matched", default=None, help="ordinary prompts in the concept's style (optional)")
    p.add_argument("--pairs", default=None, help="concept/neutral pairs: .csv or .jsonl with columns concept, neutral")
    p.add_argument("--column", default="prompt", help="prompt column of csv/jsonl/parquet prompt files")
    p.add_argument("--train-fraction", type=float, default=0.5, help="share of each prompt file that fits the "
                   "readers (and LEACE); the rest is measured (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--fpr", type=float, default=0.05, help="the fixed reader's false-positive rate on the "
                   "training ordinary prompts (default 0.05)")
    p.add_argument("--baselines", default="", help="comma-separated: leace (every prompt), leace-gated (prompts "
                   "the edit's gate flags); needs concept-erasure")
    add_batching_args(p)
    p.add_argument("--max-length", type=int, default=None, help="tokenizer padding/truncation length")
    p.add_argument("--out", required=True, help="results: a .json file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_efficacy)

"""`snce-fast identify`: contrastive identification (docs/identification.md, "Contrastive identification"):
the latent(s) that fire on concept prompts and not on their neutral twins, in every family of wording,
with a leave-one-family-out transfer check and (--edit-check) the edit strength chosen with them."""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

from snce_fast.cli._common import (
    UsageError,
    add_batching_args,
    add_model_args,
    apply_threads,
    atomic_write_json,
    check_max_length_arg,
    check_out_file,
    finite,
    load_encoder,
    load_sae,
    output_lock,
    positive,
    read_prompt_file,
    skip_summary,
)
from snce_fast.cli.calibrate import _groups
from snce_fast.hooks.activations import check_max_length
from snce_fast.hooks.compat import check_sae_fits
from snce_fast.records.calibration import calibration_record, ranked_entry
from snce_fast.sae.fingerprint import sae_hash
from snce_fast.workflow import pairs as pairs_lib
from snce_fast.workflow.contrastive import (
    DEFAULT_FPR, DEFAULT_TWIN_FPR, OBJECTIVES, Family, activation_table, contrastive, families_from_pairs,
    transfer_matrix,
)


def _rate(value: float, flag: str) -> float:
    finite(value, flag)
    if not 0.0 <= value < 1.0:
        raise UsageError(f"{flag} {value}: expected a rate with 0 <= rate < 1")
    return value


def _check_flags(args: argparse.Namespace) -> Path:
    for flag, value in (("--min-tokens", args.min_tokens), ("--batch-size", args.batch_size),
                        ("--token-budget", args.token_budget), ("--max-length", args.max_length),
                        ("--max-size", args.max_size), ("--n-per-family", args.n_per_family),
                        ("--report", args.report)):
        positive(value, flag)
    _rate(args.twin_fpr, "--twin-fpr")
    _rate(args.fpr, "--fpr")
    apply_threads(args.threads)
    out = check_out_file(args.out)
    if out.suffix.lower() != ".json":
        raise UsageError(f"--out {args.out!r}: expected a .json file name")
    if not (args.pairs or args.generate or args.phrasing):
        raise UsageError("give concept/neutral pairs: --pairs FILE, --generate nudity|style:ARTIST or "
                         "--phrasing FAMILY=TEMPLATE")
    if not args.reference:
        raise UsageError("give at least one --reference NAME=FILE (generic captions, e.g. COCO)")
    check_max_length_arg(args)
    return out


def _pairs(args: argparse.Namespace) -> list[pairs_lib.Pair]:
    out: list[pairs_lib.Pair] = []
    notes: list[str] = []
    for path in args.pairs or []:
        skipped: dict[str, int] = {}
        try:
            got = pairs_lib.read_pairs(path, skipped=skipped, what="--pairs")
        except ValueError as e:
            raise UsageError(str(e)) from None
        if pairs_lib.skip_summary(skipped):
            notes.append(f"--pairs {path}: {pairs_lib.skip_summary(skipped)}")
        out += got
    try:
        for name in args.generate or []:
            spec = pairs_lib.builtin_spec(name)
            out += [pairs_lib.Pair(p.concept, p.neutral, f"{name}:{p.family}")
                    for p in pairs_lib.generate_pairs(spec, args.n_per_family, args.seed)]
        if args.phrasing:
            spec = pairs_lib.PhrasingSpec("phrasing", {})
            for text in args.phrasing:
                fam, ph = pairs_lib.parse_phrasing(text)
                spec.families.setdefault(fam, []).append(ph)
            out += pairs_lib.generate_pairs(spec, args.n_per_family, args.seed)
    except ValueError as e:
        raise UsageError(f"{'--phrasing' if args.phrasing and 'phrasing' in str(e) else '--generate'}: {e}") from None
    for note in notes:  # once every pair source is read: a bad flag stays one line
        print(note, file=sys.stderr)
    return out


def _concept_only(args: argparse.Namespace) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in args.concept_prompts or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UsageError(f"--concept-prompts {spec!r}: expected NAME=FILE")
        skipped: dict[str, int] = {}
        prompts = read_prompt_file(path.strip(), f"--concept-prompts {name.strip()}", args.column, skipped=skipped)
        if not prompts:
            raise UsageError(f"--concept-prompts {spec!r}: no usable prompts "
                             f"({skip_summary(skipped, args.column) or 'no rows'})")
        out[name.strip()] = prompts
    return out


def _edit_check(args: argparse.Namespace, loaded: Any, sae: Any, fit: Any, fams: list[Family],
                refs: dict[str, list[str]]) -> dict[str, Any]:
    """Candidates x strengths measured with the fixed reader (snce_fast.evaluation.selection)."""
    from snce_fast.evaluation.efficacy import PromptSets
    from snce_fast.evaluation.selection import choose_edit

    pairs = [(c, n) for f in fams for c, n in zip(f.concept, f.twins)]
    if len(pairs) < 4:
        raise UsageError(f"--edit-check: {len(pairs)} pairs; expected at least 4 (half fit the reader, half are measured)")
    random.Random(args.seed).shuffle(pairs)
    only = [c for f in fams if not f.twins for c in f.concept]
    cut = len(pairs) // 2
    generic = [p for ps in refs.values() for p in ps]
    random.Random(args.seed).shuffle(generic)
    g_cut = max(1, len(generic) // 2)
    sets = PromptSets([c for c, _ in pairs[:cut]] + only[: len(only) // 2],
                      [n for _, n in pairs[:cut]] + generic[:g_cut], [c for c, _ in pairs[cut:]] + only[len(only) // 2:],
                      generic[g_cut:] or generic, pairs=pairs[cut:])
    choice = choose_edit(loaded.encoder, sae, fit.candidates(3, args.max_size), sets, min_tokens=args.min_tokens,
                         tokenizer=loaded.tokenizer, max_length=args.max_length, batch_size=args.batch_size,
                         penultimate_output=loaded.penultimate_output, progress=not args.quiet)
    return {"latents": choice.latents, "thresholds": choice.thresholds, "strength": choice.strength,
            "meets_twin_bound": choice.meets_twin_bound, "rows": choice.rows}


def cmd_identify(args: argparse.Namespace) -> int:
    out = _check_flags(args)
    with output_lock(out):
        return _run(args, out)


def _run(args: argparse.Namespace, out: Path) -> int:
    pairs = _pairs(args)
    try:
        fams = families_from_pairs(pairs, _concept_only(args))
    except ValueError as e:
        raise UsageError(f"--concept-prompts: {e}") from None
    refs = _groups(args.reference, args.column)
    sae = load_sae(args.sae)
    loaded = load_encoder(args.model, args.encoder)
    check_sae_fits(sae, loaded.encoder, loaded.penultimate_output)
    check_max_length(loaded.encoder, loaded.tokenizer, args.max_length)
    if args.edit_check and sae.hook != "output":
        raise UsageError(f"--edit-check: the SAE's hook is {sae.hook!r}; the edit is measured at the encoder output "
                         "(expected an SAE at hook 'output')")
    prompts = [p for f in fams for p in f.concept + f.twins] + [p for ps in refs.values() for p in ps]
    table = activation_table(loaded.encoder, sae, prompts, None, loaded.tokenizer, args.min_tokens, args.batch_size,
                             args.max_length, loaded.penultimate_output, args.token_budget,
                             None if args.quiet else "identify")
    opts = dict(twin_fpr=args.twin_fpr, fpr=args.fpr, objective=args.objective)
    fit = contrastive(table, fams, refs, **opts)
    sel = fit.select(args.max_size) if args.max_size > 1 else fit.selection(fit.top(1))
    transfer = None
    if len(fams) >= 2 and not args.no_transfer:
        transfer = transfer_matrix(table, fams, refs, max_size=args.max_size, **opts)
    edit = _edit_check(args, loaded, sae, fit, fams, refs) if args.edit_check else None
    latents, thresholds = (edit["latents"], edit["thresholds"]) if edit else (sel.latents, sel.thresholds)
    ranked = [dict(ranked_entry(j, float(fit.thresholds[i]), float(fit.recall[:, i].mean()),
                                {g: float(r[i]) for g, r in fit.reference_rates.items()}),
                   score=float(fit.score[i]), family_recall={f: float(fit.recall[k, i]) for k, f in enumerate(fit.families)})
              for i, j in enumerate(fit.latents[: args.report])]
    record = calibration_record(
        sae=str(args.sae), sae_hash=sae_hash(sae), model=args.model, encoder=args.encoder,
        penultimate_output=loaded.penultimate_output, target="pairs", references={g: len(p) for g, p in refs.items()},
        fpr=fit.fpr, min_tokens=args.min_tokens, max_length=args.max_length, neurons=latents, thresholds=thresholds,
        ranked=ranked)
    record["rule"] = {"name": "contrastive", "objective": args.objective, "twin_fpr": args.twin_fpr,
                      "max_size": args.max_size, "families": {f.name: {"concept": len(f.concept), "twins": len(f.twins)}
                                                             for f in fams}}
    record["selection"] = {"latents": sel.latents, "thresholds": sel.thresholds, "objective": sel.objective,
                           "family_recall": sel.family_recall, "family_twin_rate": sel.family_twin_rate,
                           "twin_rate": sel.twin_rate, "reference_rates": sel.reference_rates}
    if transfer is not None:
        record["transfer"] = {"rows": transfer.rows, "mean_held_out": transfer.mean_held_out()}
    if edit is not None:
        record["edit"] = edit
    _print(fit, sel, transfer, edit)
    atomic_write_json(out, record)
    print(f"wrote {out}; next: snce-fast erase ... --calibration {out}" + (
        f" {'--clamp' if 'clamp' in edit['strength'] else '--scale'} {list(edit['strength'].values())[0]:g}"
        if edit else ""))
    return 0


def _print(fit: Any, sel: Any, transfer: Any, edit: Any) -> None:
    rec = ", ".join(f"{f} {r:.0%}" for f, r in sel.family_recall.items())
    tw = "no twins" if sel.twin_rate is None else f"twins {sel.twin_rate:.1%}"
    refs = ", ".join(f"{g} {r:.1%}" for g, r in sel.reference_rates.items())
    print(f"selection {sel.latents} (thresholds {', '.join(f'{t:.4g}' for t in sel.thresholds)}): flags {rec}; "
          f"{tw}; {refs}")
    if transfer is not None:
        m = transfer.mean_held_out()
        print("transfer (selected without the family, measured on it): " + ", ".join(
            f"{r['left_out']} {transfer.held_out(r['left_out'])['concept']:.0%}" for r in transfer.rows)
              + f"; mean {m['concept']:.0%} of concept prompts"
              + ("" if m["twins"] is None else f", {m['twins']:.0%} of twins"))
    if edit is not None:
        best = next(r for r in edit["rows"] if r["latents"] == edit["latents"] and r["strength"] == edit["strength"])
        print(f"edit check: {best['label']} (gated): reader hits on concept prompts {best['concept_flag_before']:.0%} -> "
              f"{best['concept_flag_after']:.0%}, twins bit-identical {best['twins_identical']:.0%}"
              + ("" if edit["meets_twin_bound"] else " (no candidate kept 90% of twins bit-identical)"))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "identify", help="contrastive identification on concept/neutral pairs, with a transfer check (step 3b)",
        description="Picks the latent(s) that fire on concept prompts and not on their neutral twins, in every "
        "family of wording (docs/identification.md). Pairs come from --pairs files (csv/jsonl with columns "
        "concept, neutral and optionally family), --generate (built-in phrasings: nudity, style:ARTIST) or "
        "--phrasing FAMILY=TEMPLATE[|NEUTRAL] ({x} = a generated scene); --concept-prompts adds a family without "
        "twins. Each latent's threshold flags at most --twin-fpr of the twins and --fpr of every --reference "
        "group; latents are ranked by the mean over families of recall minus twin rate (--objective mean). The "
        "leave-one-family-out transfer matrix shows whether the choice holds on wording it never saw; "
        "--edit-check measures candidates x edit strengths with the fixed linear reader and picks both. "
        "Writes a calibration.json (snce-fast erase / detect --calibration FILE).",
        epilog="example: snce-fast identify --sae my_sae/ --generate nudity --pairs my_pairs.csv "
        "--reference coco=coco.csv --edit-check --out identify.json",
    )
    add_model_args(p)
    p.add_argument("--sae", required=True, help="SAE directory trained on --model")
    p.add_argument("--pairs", action="append", metavar="FILE", help="concept/neutral pairs (.csv/.jsonl), repeatable")
    p.add_argument("--generate", action="append", metavar="NAME", help="built-in phrasings to generate pairs "
                   "from: nudity or style:ARTIST (repeatable)")
    p.add_argument("--phrasing", action="append", metavar="FAMILY=TEMPLATE[|NEUTRAL]", help="a phrasing of the "
                   "concept ({x} = the scene; neutral twin default '{x}'), repeatable; one family per name")
    p.add_argument("--n-per-family", type=int, default=40, help="generated pairs per family (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated pairs and of --edit-check's split")
    p.add_argument("--concept-prompts", action="append", metavar="NAME=FILE", help="a family of concept prompts "
                   "without twins (repeatable)")
    p.add_argument("--reference", action="append", metavar="NAME=FILE[,FILE...]",
                   help="generic captions (repeatable groups), e.g. coco=coco.csv")
    p.add_argument("--twin-fpr", type=float, default=DEFAULT_TWIN_FPR, help="share of twins a latent's threshold "
                   f"may flag (default {DEFAULT_TWIN_FPR})")
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR, help=f"share of each reference group (default {DEFAULT_FPR})")
    p.add_argument("--objective", choices=OBJECTIVES, default="mean", help="per-family contrast to maximise: mean "
                   "(default, measured best on held-out families) or min (the worst family)")
    p.add_argument("--max-size", type=int, default=3, help="latents in the greedy set (default 3; 1 = the best latent)")
    p.add_argument("--no-transfer", action="store_true", help="skip the leave-one-family-out matrix")
    p.add_argument("--edit-check", action="store_true", help="choose the selection and edit strength together "
                   "(scale 0, -2, -4, clamp -1; gated) with the fixed reader; needs an SAE at hook 'output'")
    p.add_argument("--report", type=int, default=20, help="ranked latents in the output (default 20)")
    p.add_argument("--min-tokens", type=int, default=1, help="counted tokens a latent must fire on (default 1)")
    p.add_argument("--column", default="prompt", help="prompt column of csv/jsonl/parquet prompt files")
    add_batching_args(p)
    p.add_argument("--max-length", type=int, default=None, help="pad prompts to this many tokens")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--out", required=True, help="the calibration .json file to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_identify)

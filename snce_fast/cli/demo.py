"""`snce-fast demo`: the whole SNCE workflow on a real text encoder, offline."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from snce_fast.cli._common import UsageError, add_model_args, check_out_dir, output_lock, positive
from snce_fast.demo.run import run_demo
from snce_fast.records.atomic import check_writable_dir
from snce_fast.train.config import REPORT_WINDOW


def cmd_demo(args: argparse.Namespace) -> int:
    positive(args.threads, "--threads")
    out = check_out_dir(args.out)
    try:
        check_writable_dir(out)  # before the encoder is loaded and the SAE trained
    except ValueError as e:
        raise UsageError(f"--out: {e}") from None
    with output_lock(out):
        s = run_demo(out, model=args.model, encoder=args.encoder, quick=args.quick, seed=args.seed,
                     progress=not args.quiet, threads=args.threads)
    _print_summary(s, out)
    return 0


def _print_summary(s: dict[str, Any], out: Path) -> None:
    d, e, p, r = s["detect"], s["edit"], s["prompts"], s["neuron_rule"]
    window = min(REPORT_WINDOW, s["sae"]["steps"])
    print()
    print(f"SAE: n {s['sae']['n_latents']} k {s['sae']['k']}, training FVU (mean of the last {window} steps) "
          f"{s['sae']['train_fvu']:.3f}, dead {s['sae']['dead_fraction']:.1%}")
    twins = "" if r["scan_twin_rate"] is None else (f", {r['scan_twin_rate']:.0%} of their neutral twins (at most "
                                                     f"{r['twin_fpr']:.0%})")
    print(f"neuron for '{s['concept']}': latent {s['neuron']}, picked by contrastive identification: at its threshold "
          f"{r['threshold']:.3g} it flags {r['scan_recall']:.0%} of the scanned concept prompts ("
          + ", ".join(f"{f} {x:.0%}" for f, x in r["family_recall"].items()) + f"){twins} and "
          f"{r['scan_ordinary_rate']:.0%} of the ordinary ones (at most {r['fpr']['ordinary']:.0%} allowed)")
    for text in s["neuron_top_prompts"][:3]:
        print(f"  fires most on: {text}")
    print(f"detect on held-out prompts (wording never seen): {d['concept_flagged']}/{p['held_concept']} concept "
          f"flagged ({d['true_positive_rate']:.0%}), {d['ordinary_flagged']}/{p['held_ordinary']} ordinary flagged "
          f"({d['false_positive_rate']:.0%})")
    for m in d["score_top"]:
        print(f"  for comparison, the scorer's top {len(m['latents'])} {m['latents']} (any firing): "
              f"{m['true_positive_rate']:.0%} concept, {m['false_positive_rate']:.0%} ordinary flagged")
    print(f"residual edit: {e['ordinary_silent_bit_identical']}/{e['ordinary_silent']} ordinary prompts where the "
          f"neuron is silent are bit-identical; {e['concept_changed']}/{p['held_concept']} concept prompts changed, "
          f"the neuron re-fires on {e['concept_refires_after_edit']} of them after the edit")
    print(f"report: {out / s['files']['report']}  summary: {out / 'summary.md'}  plots: "
          f"{out / 'detect.png'}, {out / 'training.png'}  SAE: {out / 'sae'}")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the whole SNCE workflow, offline, on the real MiniLM encoder (start here)",
        description="Runs every SNCE step on a real text encoder, offline, in a few minutes on a CPU: builds its "
        "own prompt set (ordinary scenes and violent ones, style-matched), trains a TopK SAE on the encoder's "
        "token embeddings, scans concept vs ordinary prompts, scores the latents and picks the neuron by contrastive identification on concept prompts and their neutral twins (report "
        "with its top prompts), runs detect on held-out prompts with wording it never saw, and patches the "
        "encoder to show the residual edit leaving ordinary prompts bit-identical. Writes the SAE, the scan, "
        "report.md, PNG plots and summary.md/json to --out. Then do the same on your data: snce-fast train, "
        "scan, score, detect, erase.",
    )
    add_model_args(p)
    p.add_argument("--out", default="snce_demo", help="output directory (default ./snce_demo)")
    p.add_argument("--quick", action="store_true", help="smaller prompt set and SAE (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default 2, so every machine "
                   "prints the numbers of docs/demo.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

"""`snce-fast demo`: the whole SNCE workflow on a real text encoder, offline."""
from __future__ import annotations

import argparse
from typing import Any

from snce_fast.cli._common import add_model_args, apply_threads, check_out_dir
from snce_fast.demo.run import run_demo


def cmd_demo(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out)
    apply_threads(args.threads)
    s = run_demo(out, model=args.model, encoder=args.encoder, quick=args.quick, seed=args.seed,
                 progress=not args.quiet)
    d, e, p = s["detect"], s["edit"], s["prompts"]
    print()
    print(f"SAE: n {s['sae']['n_latents']} k {s['sae']['k']}, training FVU {s['sae']['train_fvu']:.3f}, "
          f"dead {s['sae']['dead_fraction']:.1%}")
    print(f"neuron for '{s['concept']}': latent {s['neuron']} (fires on {s['top_latents'][0]['f_concept']:.0%} of "
          f"scanned concept prompts, {s['top_latents'][0]['f_ordinary']:.0%} of ordinary ones)")
    for text in s["neuron_top_prompts"][:3]:
        print(f"  fires most on: {text}")
    print(f"detect on held-out prompts: {d['concept_flagged']}/{p['held_concept']} concept flagged "
          f"({d['true_positive_rate']:.0%}), {d['ordinary_flagged']}/{p['held_ordinary']} ordinary flagged "
          f"({d['false_positive_rate']:.0%})")
    for m in d["more_latents"]:
        print(f"  with the top {len(m['latents'])} latents: {m['true_positive_rate']:.0%} concept, "
              f"{m['false_positive_rate']:.0%} ordinary flagged")
    c = d["calibrated"]
    print(f"  calibrated rule (threshold at {c['fpr']['ordinary']:.0%} of ordinary scan prompts): latent "
          f"{c['latents'][0]}: {c['true_positive_rate']:.0%} concept, {c['false_positive_rate']:.0%} ordinary flagged")
    print(f"residual edit: {e['ordinary_silent_bit_identical']}/{e['ordinary_silent']} ordinary prompts where the "
          f"neuron is silent are bit-identical; {e['concept_changed']}/{p['held_concept']} concept prompts changed, "
          f"the neuron re-fires on {e['concept_refires_after_edit']} of them after the edit")
    print(f"report: {out / s['files']['report']}  summary: {out / 'summary.md'}  plots: "
          f"{out / 'detect.png'}, {out / 'training.png'}  SAE: {out / 'sae'}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the whole SNCE workflow, offline, on the real MiniLM encoder (start here)",
        description="Runs every SNCE step on a real text encoder, offline, in a few minutes on a CPU: builds its "
        "own prompt set (ordinary scenes and violent ones, style-matched), trains a TopK SAE on the encoder's "
        "token embeddings, scans concept vs ordinary prompts, scores the latents and picks the neuron (report "
        "with its top prompts), runs detect on held-out prompts with wording it never saw, and patches the "
        "encoder to show the residual edit leaving ordinary prompts bit-identical. Writes the SAE, the scan, "
        "report.md, PNG plots and summary.md/json to --out. Then do the same on your data: snce-fast train, "
        "scan, score, detect, erase.",
    )
    add_model_args(p)
    p.add_argument("--out", default="snce_demo", help="output directory (default ./snce_demo)")
    p.add_argument("--quick", action="store_true", help="smaller prompt set and SAE (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

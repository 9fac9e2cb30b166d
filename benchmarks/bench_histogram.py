"""Benchmark: `snce_fast::histogram_update` (C++/OpenMP on CPU, CUDA atomics on GPU) vs an eager
torch equivalent (scatter_add_ / unique / bincount, `histogram.update_eager`), same inputs.

Shapes: SD1.x prompts (77 tokens, ~22 counted), k 64, n 32768, 2 groups; 16/64/256 prompts per
batch. On GPU the SAE encode at the same shape is timed too (docs/performance.md: histograms <= 5% of it).
Without CUDA it runs in CPU mode and writes results/histogram_cpu.json (CPU numbers only).

    python benchmarks/bench_histogram.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from snce_fast.ops import backend, histogram as H  # noqa: E402

L, K, N, G, COUNTED = 77, 64, 32768, 2, 22


def inputs(P: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M = P * L
    idx = torch.randint(0, N, (M, K), generator=g, dtype=torch.int32)
    val = torch.rand(M, K, generator=g).to(dtype)
    pos = torch.arange(L).repeat(P)
    mask = (pos >= 1) & (pos <= COUNTED)
    gop = torch.arange(P) % G
    return [t.to(device) for t in (idx, val, mask, H.batch_layout(P, L), gop)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if C.ON_GPU else "cpu"
    dtype = torch.bfloat16 if C.ON_GPU else torch.float32
    sizes = (16, 64) if args.quick else (16, 64, 256)
    reps = 5 if args.quick else 15
    rows = []
    print(f"device: {C.device_name()}  threads: {torch.get_num_threads()}  mode: {C.mode().upper()}")
    for P in sizes:
        batch = inputs(P, device, dtype)
        for impl in ("op", "eager"):
            state = H.Histograms.zeros(G, N, device)
            ms = C.bench(lambda: H.update(*batch, state, backend=impl), warmup=2, reps=reps) * 1e3
            rows.append({"group": f"n{N}_k{K}", "prompts": P, "tokens": P * L, "impl": impl, "ms": ms})
        if C.ON_GPU:
            sae = C.make_sae(768, N, K, dtype, device)
            x = torch.randn(P * L, 768, device=device, dtype=dtype)
            ms = C.bench(lambda: backend.encode(x, sae), warmup=2, reps=reps) * 1e3
            rows.append({"group": f"n{N}_k{K}", "prompts": P, "tokens": P * L, "impl": "sae_encode", "ms": ms})
    by = {(r["prompts"], r["impl"]): r["ms"] for r in rows}
    for r in rows:
        if r["impl"] == "op":
            r["speedup_vs_eager"] = by[(r["prompts"], "eager")] / r["ms"]
            if (r["prompts"], "sae_encode") in by:
                r["pct_of_sae_encode"] = 100 * r["ms"] / by[(r["prompts"], "sae_encode")]
    label = "" if C.ON_GPU else " [CPU]"
    for r in rows:
        extra = "".join(f"  {k}={r[k]:.3g}" for k in ("speedup_vs_eager", "pct_of_sae_encode") if k in r)
        print(f"prompts={r['prompts']:<4} {r['impl']:<11} {r['ms']:9.3f} ms{label}{extra}")
    C.write("histogram", rows, {"threads": torch.get_num_threads(), "dtype": str(dtype), "shape": {
        "L": L, "k": K, "n": N, "groups": G, "counted_tokens_per_prompt": COUNTED}})


if __name__ == "__main__":
    main()

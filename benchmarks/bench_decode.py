"""Benchmark: sparse decode (gather of k rows) vs reference, EleutherAI-style and SAELens dense decode.

`python benchmarks/bench_decode.py [--quick]`; results in benchmarks/results/decode_<gpu|cpu>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from snce_fast import kernels  # noqa: E402
from snce_fast.ops import reference  # noqa: E402


def eleuther_decode(values, indices, sae):
    """sparsify-style: embedding_bag over W_dec rows weighted by the values."""
    M, k = values.shape
    return F.embedding_bag(indices.long(), sae.W_dec, per_sample_weights=values, mode="sum") + sae.b_dec


def saelens_decode(values, indices, sae):
    dense = values.new_zeros(values.shape[0], sae.W_dec.shape[0]).scatter_(-1, indices.long(), values)
    return dense @ sae.W_dec + sae.b_dec


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--prompts", type=int, nargs="+", help="prompt counts timed on a GPU (default 1 16 64 256; "
                    "--quick: 1 64); CPU mode keeps its tiny shapes")
    args = ap.parse_args(argv)
    dev = "cuda" if C.ON_GPU else "cpu"
    dtype = torch.bfloat16 if C.ON_GPU else torch.float32
    if C.ON_GPU:
        d, n, k = 768, 32768, 64
        prompts, reps = ([1, 16, 64, 256] if not args.quick else [1, 64]), (10 if args.quick else 30)
        prompts = args.prompts or prompts
    else:
        (d, n, k), prompts, reps = (64, 1024, 8), [1, 2], 3
    sae = C.make_sae(d, n, k, dtype, dev)
    compiled = torch.compile(reference.decode) if (C.ON_GPU and not args.no_compile) else None
    rows = []
    for p in prompts:
        M = p * 77
        values = torch.rand(M, k, device=dev, dtype=dtype)
        indices = torch.randint(0, n, (M, k), device=dev, dtype=torch.int32)
        impls = {
            "fused": lambda: kernels.decode(values, indices, sae),
            "reference": lambda: reference.decode(values, indices, sae),
            "eleuther_eager": lambda: eleuther_decode(values, indices, sae),
            "saelens_dense": (lambda: saelens_decode(values, indices, sae)) if C.dense_fits(M, n, 2) else None,
            "compiled_reference": (lambda: compiled(values, indices, sae)) if compiled else None,
        }
        item = values.element_size()
        rows += C.time_impls(impls, {"group": f"d{d}_n{n}_k{k}", "prompts": p, "M": M, "dtype": str(dtype),
                                     "flops": 2 * M * k * d,
                                     "bytes": min(M * k, n) * d * item + M * (k * (item + 4) + d * item)}, reps)
        C.checkpoint("decode", rows)
    C.report("decode", rows)
    return rows


if __name__ == "__main__":
    main()

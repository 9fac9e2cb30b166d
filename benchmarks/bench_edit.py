"""Benchmark: the fused SNCE forward (residual edit, one target, BOS masked) vs eager alternatives.

`python benchmarks/bench_edit.py [--quick]`; results in benchmarks/results/edit_<gpu|cpu>.json.
docs/performance.md target: >= 3x the eager reference at >= 16 prompts; at 1 prompt within 2x
of the time to read W_enc once from HBM.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import torch  # noqa: E402

from snce_fast import kernels  # noqa: E402
from snce_fast.ops import reference  # noqa: E402


def eleuther_edit(x, sae, j, edit_mask):
    """matmul -> ReLU -> topk -> residual update by the target's decoder row."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    top = pre.topk(sae.k, dim=-1)
    z = (top.values * (top.indices == j)).sum(-1, keepdim=True)
    out = x - z * sae.W_dec[j]
    return torch.where((z > 0) & edit_mask.unsqueeze(-1), out, x)


def saelens_edit(x, sae, j, edit_mask):
    """dense [M, n] activations, zero the latent, dense decode, add back the reconstruction error."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.k, dim=-1)
    dense = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    recon = dense @ sae.W_dec + sae.b_dec
    dense[..., j] = 0
    out = x - recon + (dense @ sae.W_dec + sae.b_dec)
    return torch.where(edit_mask.unsqueeze(-1), out, x)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--prompts", type=int, nargs="+", help="prompt counts timed on a GPU (default 1 16 64 256; "
                    "--quick: 1 64); CPU mode keeps its tiny shapes")
    ap.add_argument("--tune-candidates", type=int, default=None,
                    help="time only the first N tuning candidates per shape (a short GPU session)")
    args = ap.parse_args(argv)
    C.limit_tuning(args.tune_candidates)
    dev = "cuda" if C.ON_GPU else "cpu"
    dtype = torch.bfloat16 if C.ON_GPU else torch.float32
    if C.ON_GPU:
        d, n, k = 768, 32768, 64
        prompts, reps = ([1, 16, 64, 256] if not args.quick else [1, 64]), (10 if args.quick else 30)
        prompts = args.prompts or prompts
    else:
        (d, n, k), prompts, reps = (64, 1024, 8), [1, 2], 3
    sae = C.make_sae(d, n, k, dtype, dev)
    j = 123
    compiled = torch.compile(reference.edit) if (C.ON_GPU and not args.no_compile) else None
    rows = []
    for p in prompts:
        M = p * 77
        x = torch.randn(p, 77, d, device=dev, dtype=dtype)
        mask = torch.ones(p, 77, dtype=torch.bool, device=dev)
        mask[:, 0] = False
        if C.ON_GPU:
            kernels.tune(x, sae)
        impls = {
            "fused": lambda: kernels.edit(x, sae, j, edit_mask=mask),
            "fused_threshold": C.with_select("threshold", lambda: kernels.edit(x, sae, j, edit_mask=mask)),
            "fused_threshold_persistent": C.with_select("threshold", lambda: kernels.edit(x, sae, j, edit_mask=mask),
                                                        "persistent"),
            "reference": lambda: reference.edit(x, sae, j, edit_mask=mask),
            "eleuther_eager": lambda: eleuther_edit(x, sae, j, mask),
            "saelens_dense": (lambda: saelens_edit(x, sae, j, mask)) if C.dense_fits(M, n, 4) else None,
            "compiled_reference": (lambda: compiled(x, sae, j, edit_mask=mask)) if compiled else None,
        }
        why = {}
        for name in ("fused", "fused_threshold", "fused_threshold_persistent", "reference"):  # kernels only: graphs
            impls[f"{name}_cuda_graph"], why[f"{name}_cuda_graph"] = C.graphed(impls[name])
        item = x.element_size()
        rows += C.time_impls(impls, {"group": f"d{d}_n{n}_k{k}", "prompts": p, "M": M, "dtype": str(dtype),
                                     "flops": 2 * M * d * n, "bytes": d * n * item + 2 * M * d * item}, reps,
                             skip_reasons=why)
        want = reference.edit(x, sae, j, edit_mask=mask)  # the fp32 oracle: each fused path's error beside its time
        C.record_agreement(rows[-len(impls):], impls, ("fused", "fused_threshold", "fused_threshold_persistent"),
                           lambda out: {"max_abs_err": float((out.float() - want.float()).abs().max())})
        C.checkpoint("edit", rows)
    C.report("edit", rows)
    return rows


if __name__ == "__main__":
    main()

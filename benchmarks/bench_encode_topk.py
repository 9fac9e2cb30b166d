"""Benchmark: fused encode + TopK vs eager reference, EleutherAI-style, SAELens-style, compiled reference.

`python benchmarks/bench_encode_topk.py [--quick]`; results in benchmarks/results/encode_topk_<gpu|cpu>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (sets TRITON_INTERPRET on CPU before triton is imported)

import torch  # noqa: E402

from snce_fast import kernels  # noqa: E402
from snce_fast.ops import reference  # noqa: E402


def eleuther_encode(x, sae):
    """matmul -> ReLU -> torch.topk (sparsify's order)."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    return pre.topk(sae.k, dim=-1)


def saelens_encode(x, sae):
    """matmul -> topk -> ReLU -> scatter into a dense [M, n] activation matrix."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="few shapes / reps (always tiny on CPU)")
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
        shapes = [(768, 32768, 64)] + ([] if args.quick else [(768, 524288, 64)])
        prompts = [1, 16, 64, 256] if not args.quick else [1, 64]
        prompts = args.prompts or prompts
        reps = 10 if args.quick else 30
    else:
        shapes, prompts, reps = [(64, 1024, 8)], [1, 2], 3
    rows = []
    for d, n, k in shapes:
        sae = C.make_sae(d, n, k, dtype, dev)
        group = f"d{d}_n{n}_k{k}"
        compiled = None
        if C.ON_GPU and not args.no_compile:
            compiled = torch.compile(reference.encode)
        for p in prompts:
            M = p * 77
            x = torch.randn(p, 77, d, device=dev, dtype=dtype)
            if C.ON_GPU:
                kernels.tune(x, sae)  # per-device-name cached choice of tile config
            impls = {
                "fused": lambda: kernels.encode(x, sae),
                "fused_threshold": C.with_select("threshold", lambda: kernels.encode(x, sae)),
                "fused_threshold_persistent": C.with_select("threshold", lambda: kernels.encode(x, sae), "persistent"),
                "reference": lambda: reference.encode(x, sae),
                "eleuther_eager": lambda: eleuther_encode(x, sae),
                "saelens_dense": (lambda: saelens_encode(x, sae)) if C.dense_fits(M, n, x.element_size()) else None,
                "compiled_reference": (lambda: compiled(x, sae)) if compiled else None,
            }
            graph_fused, graph_why = C.graphed(impls["fused"])  # replayed from a CUDA graph: kernels only
            impls["fused_cuda_graph"] = graph_fused
            graph_thr, graph_thr_why = C.graphed(impls["fused_threshold"])
            impls["fused_threshold_cuda_graph"] = graph_thr
            graph_per, graph_per_why = C.graphed(impls["fused_threshold_persistent"])
            impls["fused_threshold_persistent_cuda_graph"] = graph_per
            # the filter as an ordinary launch: what its programmatic dependent launch saves (replays only)
            graph_np, graph_np_why = C.graphed(C.with_select("threshold", lambda: kernels.encode(x, sae), pdl=False))
            impls["fused_threshold_no_pdl_cuda_graph"] = graph_np
            item = x.element_size()
            rows += C.time_impls(
                impls,
                {"group": group, "d": d, "n": n, "k": k, "prompts": p, "M": M, "dtype": str(dtype),
                 "flops": 2 * M * d * n, "bytes": d * n * item + M * d * item + M * k * 8},
                reps,
                skip_reasons={"saelens_dense": "dense [M, n] too large", "fused_cuda_graph": graph_why,
                              "fused_threshold_cuda_graph": graph_thr_why,
                              "fused_threshold_persistent_cuda_graph": graph_per_why,
                              "fused_threshold_no_pdl_cuda_graph": graph_np_why, "compiled_reference": (
                    "torch.compile skipped on CPU (Inductor CPU codegen too slow for a tiny run)" if not C.ON_GPU
                    else "--no-compile")},
            )
            want = reference.encode(x, sae)  # the fp32 oracle: each fused path's agreement beside its time
            C.record_agreement(rows[-len(impls):], impls, ("fused", "fused_threshold", "fused_threshold_persistent"),
                               lambda out: C.topk_agreement(out, want))
            C.checkpoint("encode_topk", rows)
        del sae
    C.report("encode_topk", rows)
    return rows


if __name__ == "__main__":
    main()

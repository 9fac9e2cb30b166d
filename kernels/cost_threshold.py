"""Static cost model of the "threshold" selection (kernels/encode_threshold.py), with no GPU: MODELLED.

    python -m snce_fast.kernels.cost_threshold [--arch 90 100] [--out-dir benchmarks/results] [--no-real]

For the modelled shapes of `cost_report` (bf16 at d 768, n 32768, k 64 for 1/16/64/128 prompts of 77 tokens, and
the real MiniLM SAE's shape) it compiles the three launches (`compile_check.threshold_case`), counts their SASS
instructions per loop (`kernels.sass`), replays the threshold and every row's survivor count on the random SPEC
SAE and on the real MiniLM SAE with real token activations (numpy, the kernels' exact key arithmetic), and
models one call with `cost_report`'s GPU constants and assumptions plus those in `ASSUMPTIONS` here. Writes
`cost_threshold_sm<arch>.json`; docs/performance.md ("Threshold selection, modelled") has the table.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import tempfile
from dataclasses import asdict
from typing import Any, Optional

import numpy as np

from .compile_check import PROMPT_TOKENS, asm_layout_problems, compile_binary, threshold_case
from .cost_report import (ASSUMPTIONS as REPORT_ASSUMPTIONS, DEP_LATENCY, GPUS, ISSUE_RATE, LAUNCH_S, PROMPTS,
                          REAL_ACTS, REAL_SAE, SPEC, model_eager, modelled_targets, occupancy, real_inputs,
                          spec_inputs)

_INT32_MIN = -(2**31)
ASSUMPTIONS = [
    "MODELLED, not measured: nothing here ran on a GPU",
    "a kernel's time = max(issue bound, tensor-core bound, HBM floor, L2 floor), issue and tensor-core bounds as "
    "in cost_report (per SM, list-scheduled programs, low/high issue efficiency); the ALU/shuffle pipe bounds "
    "of cost_report are not applied here",
    "per-program warp instructions = instructions outside loops + the MMA loop x ceil(d / BK) (+ the row-block "
    "sort loop x ceil(real rows / RS) for one program per row block in _threshold_kernel); the tail: instructions "
    "outside "
    "loops (both branches of the overflow test counted: an upper bound) + the merge loop x (ceil(count / BS) - 1) "
    "per row, and for a row whose survivors overflow the direct loop nest x its trip counts",
    "the filter's per-entry append path (the instructions its compare branches over) runs in a warp when any of "
    "the warp's 32 lanes has a candidate there: with survivors spread evenly and independently, a fraction "
    "1 - (1 - survivors / n)^32 of it (~50% at 2% survivors) is counted",
    "HBM floor: W_enc read once per launch (1/step of it for the sampling launch), x, the survivors written and "
    "read (8 bytes each), outputs; L2 floor: W_enc once per row block (repeats assumed to hit L2)",
    "3 launches per call at LAUNCH_S each; eager bf16 as in cost_report (model_eager)",
    "the filter is a programmatic dependent launch of the sampling launch (sm_90+): its launch gap (LAUNCH_S) and "
    "min(the row-block sort of the sampling launch's last program, one filter tile's compute, the sampling launch's "
    "compute time above its memory floors) are hidden, as its first programs compute a tile while the sort runs "
    "and wait only before the epilogue",
]


# ---------------------------------------------------------------------------------------------- replay
def order_keys(pre: np.ndarray) -> np.ndarray:
    """int32 keys ordering like the fp32 values, NaN above +inf (the high word of the kernels' `_pack`)."""
    b = np.atleast_1d(pre).astype(np.float32).view(np.int32).copy()
    b[np.isnan(np.atleast_1d(pre))] = 0x7FC00000
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def threshold_values(thr: np.ndarray) -> np.ndarray:
    """fp32 values of int32 key thresholds, as the filter's `_threshold_value` (clamped to -inf..+inf)."""
    t = np.clip(thr, order_keys(np.float32(-np.inf)), order_keys(np.float32(np.inf))).astype(np.int32)
    return np.where(t >= 0, t, t ^ 0x7FFFFFFF).astype(np.int32).view(np.float32)


def replay_survivors(x: np.ndarray, W: np.ndarray, bias: np.ndarray, k: int, plan: Any, margin: int,
                     chunk: int = 512) -> dict:
    """Every row's threshold and survivor count as `_threshold_kernel` and `_filter_kernel` compute them (fp32
    pre-activations of the bf16-rounded inputs), and whether the true top k all survive (they must). `thresholds`:
    the rows' int32 key thresholds (the filter passes `not pre < threshold_values(thresholds)`)."""
    BN, R, step, NS = plan.cfg.BN, plan.R, plan.step, plan.NS
    counts = np.zeros(x.shape[0], dtype=np.int64)
    thresholds = np.zeros(x.shape[0], dtype=np.int32)
    lost = 0
    for r0 in range(0, x.shape[0], chunk):
        pre = x[r0:r0 + chunk] @ W + bias[None, :]
        hi = order_keys(pre)
        gmax = []
        for j in range(NS):
            tile = np.full((hi.shape[0], BN), _INT32_MIN, dtype=np.int64)
            c0 = j * step * BN
            part = hi[:, c0:c0 + BN]
            tile[:, :part.shape[1]] = part
            gmax.append(tile.reshape(-1, R, BN // R).max(-1))
        g = np.concatenate(gmax, axis=1)
        hk = np.sort(g, axis=1)[:, -k] if g.shape[1] >= k else np.full(g.shape[0], _INT32_MIN)
        thr = np.where(hk > _INT32_MIN + margin, hk - margin, _INT32_MIN)
        surv = ~(pre < threshold_values(thr)[:, None])  # the filter's float compare (NaN passes)
        counts[r0:r0 + chunk] = surv.sum(1)
        thresholds[r0:r0 + chunk] = thr
        top = np.argpartition(-np.where(np.isnan(pre), np.inf, pre), k - 1, axis=1)[:, :k]
        lost += int((~np.take_along_axis(surv, top, 1)).sum())
    return dict(counts=counts, thresholds=thresholds, lost_top_k_entries=lost)


def replay_summary(rep: dict, plan: Any) -> dict:
    c = rep["counts"]
    return dict(rows=int(c.size), survivors_mean=round(float(c.mean()), 1), survivors_p50=int(np.median(c)),
                survivors_p99=int(np.percentile(c, 99)), survivors_max=int(c.max()),
                overflow_rows=int((c > plan.CAP).sum()), CAP=plan.CAP, BS=plan.BS,
                rows_needing_more_than_one_merge_block=int((c > plan.BS).sum()),
                true_top_k_entries_lost=rep["lost_top_k_entries"])


# ---------------------------------------------------------------------------------------------- SASS
def _sass_row(case: Any, arch: int, cache_dir: Optional[str]) -> dict:
    """Resources and loop structure of one compiled case."""
    from . import sass
    from .compile_check import _ptxas_resources

    compiled, log = compile_binary(case, arch, cache_dir=cache_dir)
    res = _ptxas_resources(log)
    an = sass.analyse(sass.disassemble(compiled.asm["cubin"]))
    loops = []
    for j, lp in enumerate(an.loops):
        body = an.instrs[lp.head:lp.latch + 1]
        loops.append(dict(depth=lp.depth, head=lp.head, latch=lp.latch, instructions=lp.latch - lp.head + 1,
                          tensor_core=sum(i.cls == "tensor_core" for i in body),
                          ffma=sum(i.op == "FFMA" for i in body)))
    top = [lp for lp in loops if lp["depth"] == 0]
    counts = an.counts()
    shared = int(compiled.metadata.shared)
    guarded = sass.guarded_instructions(an.instrs, an.labels, "ATOMG") if case.kernel == "threshold_filter" else 0
    ttgir = compiled.asm.get("ttgir", "")
    asm = asm_layout_problems(ttgir) if "elementwise_inline_asm" in ttgir else None  # the gate's check, recorded
    return dict(kernel=case.kernel, label=case.label, reg=res.get("reg"), spill_stores=res.get("spill_stores", 0),
                append_path_instructions=guarded, asm_layout_problems=asm,
                shared_bytes=shared, num_warps=case.num_warps, instructions=counts["instructions"],
                wgmma=counts["wgmma"], tensor_core=counts["tensor_core"], tma=counts["tma"], loops=loops,
                outside_loops=counts["instructions"] - sum(lp["instructions"] for lp in top),
                occupancy=occupancy(res.get("reg") or 255, case.num_warps, shared))


def _mma_loop(row: dict) -> dict:
    return max(row["loops"], key=lambda lp: 1000 * lp["tensor_core"] + lp["ffma"])


def _children(row: dict, lp: dict) -> list[dict]:
    return [c for c in row["loops"] if c is not lp and lp["head"] <= c["head"] and c["latch"] <= lp["latch"]]


# ---------------------------------------------------------------------------------------------- model
def _schedule(gpu: Any, instr: np.ndarray, flops: np.ndarray, warps: int, occ: int, frac: float) -> dict:
    """(low, high) seconds of programs dealt in launch order to the least-loaded SM."""
    heap = [(0.0, s) for s in range(gpu.sms)]
    per_sm_i = np.zeros(gpu.sms)
    per_sm_f = np.zeros(gpu.sms)
    per_sm_n = np.zeros(gpu.sms)
    for i in range(instr.size):
        load, s = heapq.heappop(heap)
        per_sm_i[s] += instr[i]
        per_sm_f[s] += flops[i]
        per_sm_n[s] += 1
        heapq.heappush(heap, (load + instr[i], s))
    peak_sm = gpu.bf16_flops / gpu.sms / gpu.clock_hz * frac
    out = {}
    for est in ("low", "high"):
        resident = np.minimum(occ, per_sm_n) * warps
        e = np.ones(gpu.sms) if est == "low" else np.minimum(1.0, np.maximum(resident, 1) / (ISSUE_RATE * DEP_LATENCY))
        cyc = np.maximum(per_sm_i * warps / (ISSUE_RATE * e), per_sm_f / peak_sm)
        out[est] = float(cyc.max() / gpu.clock_hz)
    return out


def _bounded(t: dict, hbm_s: float, l2_s: float) -> dict:
    return dict(compute_low_s=t["low"], compute_high_s=t["high"], hbm_floor_s=hbm_s, l2_floor_s=l2_s,
                low_s=max(t["low"], hbm_s, l2_s), high_s=max(t["high"], hbm_s, l2_s))


def model_call(rows: dict, plan: Any, counts: np.ndarray, gpu: Any, M: int, d: int, n: int, k: int) -> dict:
    """Modelled seconds of the three launches of one call (see ASSUMPTIONS)."""
    import torch

    from .encode_threshold import threshold_meta

    c = plan.cfg
    trips = -(-d // c.BK)
    tc_frac = lambda r: 1.0 if r["wgmma"] or any(op.startswith("UTC") for op in r["tensor_core"]) else (  # noqa: E731
        0.5 if r["tensor_core"] else 1 / 16)
    tile_flops = 2.0 * c.BM * c.BN * d
    out = {}
    # 1. sampling launch: MB x NS programs; the last of each row block also sorts its rows' group maxima
    r = rows["threshold"]
    mma = _mma_loop(r)
    sort_loop = max((lp for lp in r["loops"] if lp["depth"] == 0 and lp is not mma), key=lambda lp: lp["instructions"],
                    default=dict(instructions=0))
    per = r["outside_loops"] + mma["instructions"] * trips
    instr = np.full((plan.NS, plan.MB), float(per))  # launch order: row blocks fastest
    RS = threshold_meta(plan, torch.bfloat16, torch.bfloat16)["RS"]
    real_rows = np.minimum(c.BM, M - c.BM * np.arange(plan.MB))  # the sort loop runs over a block's real rows
    instr[-1, :] += sort_loop["instructions"] * -(-real_rows // RS)
    sort_s = sort_loop["instructions"] * -(-int(real_rows.max()) // RS) * r["num_warps"] / ISSUE_RATE / gpu.clock_hz
    t = _schedule(gpu, instr.ravel(), np.full(instr.size, tile_flops), r["num_warps"],
                  r["occupancy"]["ctas_per_sm"], tc_frac(r))
    sampled = plan.NS * c.BN * d * 2
    out["threshold"] = _bounded(t, (sampled + M * d * 2 + M * plan.G * 8) / gpu.hbm_bytes_s,
                                plan.MB * sampled / gpu.l2_bytes_s)
    # 2. filter launch: MB x NT programs
    r = rows["threshold_filter"]
    density = float(counts.mean()) / n  # survivors per entry
    taken = 1.0 - (1.0 - min(density, 1.0)) ** 32  # a warp runs an entry's append path when any lane passes
    guarded = r.get("append_path_instructions", 0)
    per = r["outside_loops"] - guarded * (1.0 - taken) + _mma_loop(r)["instructions"] * trips
    n_prog = plan.MB * plan.NT
    t = _schedule(gpu, np.full(n_prog, float(per)), np.full(n_prog, tile_flops), r["num_warps"],
                  r["occupancy"]["ctas_per_sm"], tc_frac(r))
    tile_s = max(per * r["num_warps"] / ISSUE_RATE / gpu.clock_hz,
                 tile_flops / (gpu.bf16_flops / gpu.sms * tc_frac(r)))  # one filter program's tile, alone on its SM
    surv = float(np.minimum(counts, plan.CAP).sum()) * 8
    out["filter"] = _bounded(t, (d * n * 2 + M * d * 2 + surv) / gpu.hbm_bytes_s, plan.MB * d * n * 2 / gpu.l2_bytes_s)
    # 3. tail: one program per row
    r = rows["threshold_select"]
    top = [lp for lp in r["loops"] if lp["depth"] == 0]
    nests = [lp for lp in top if _children(r, lp)]
    flat = [lp for lp in top if not _children(r, lp)]
    merge = max(flat, key=lambda lp: lp["instructions"], default=dict(instructions=0))
    direct = 0.0
    if nests:
        outer = max(nests, key=lambda lp: lp["instructions"])
        inner = max(_children(r, outer), key=lambda lp: lp["instructions"])
        bnf = max(plan.KP, 64)
        direct = ((outer["instructions"] - inner["instructions"]) + inner["instructions"] * -(-d // 16)) * -(-n // bnf)
    extra_blocks = np.maximum(0, -(-counts // plan.BS) - 1)
    instr = r["outside_loops"] + merge["instructions"] * extra_blocks + np.where(counts > plan.CAP, direct, 0.0)
    t = _schedule(gpu, instr.astype(np.float64), np.zeros(instr.size), r["num_warps"],
                  r["occupancy"]["ctas_per_sm"], 1.0)
    over = int((counts > plan.CAP).sum())
    out["select"] = _bounded(t, (surv + M * k * 6) / gpu.hbm_bytes_s, over * d * n * 2 / gpu.l2_bytes_s)
    out["launches_s"] = 3 * LAUNCH_S
    # the sort is hidden only where it is on the sampling launch's critical path (compute above its memory floors)
    th = out["threshold"]
    slack = max(0.0, th["compute_low_s"] - max(th["hbm_floor_s"], th["l2_floor_s"]))
    out["pdl_overlap_s"] = min(sort_s, tile_s, slack) + LAUNCH_S
    for est in ("low", "high"):
        out[f"total_no_pdl_{est}_s"] = sum(out[p][f"{est}_s"] for p in ("threshold", "filter", "select")) + out["launches_s"]
        out[f"total_{est}_s"] = out[f"total_no_pdl_{est}_s"] - out["pdl_overlap_s"]
    return out


# ---------------------------------------------------------------------------------------------- report
def build(arch: int, use_real: bool, progress: bool = True) -> dict:
    import torch
    import triton

    from snce_fast.records.run_info import metadata

    from .encode_threshold import MARGIN, gpu_threshold_config, threshold_plan

    shapes = [("random_spec", p, SPEC["d"], SPEC["n"], SPEC["k"]) for p in PROMPTS]
    if use_real:
        if not (os.path.isdir(REAL_SAE) and os.path.exists(REAL_ACTS)):
            raise FileNotFoundError(f"real SAE or activations missing ({REAL_SAE}, {REAL_ACTS}): run "
                                    "experiments/ablate_identification.py first, or pass --no-real")
        cfg = json.load(open(os.path.join(REAL_SAE, "config.json")))
        shapes += [("real_minilm", p, cfg["d_in"], cfg["n_latents"], cfg["k"]) for p in PROMPTS]
    compiled: dict[tuple, dict] = {}
    entries = []
    with tempfile.TemporaryDirectory(prefix="snce_cost_threshold_") as cache:
        for label, p, d, n, k in shapes:
            M = p * PROMPT_TOKENS
            cases = threshold_case(arch, torch.bfloat16, torch.bfloat16, k, M, n=n, d=d)
            rows = {}
            for case in cases:
                if case.key() not in compiled:
                    if progress:
                        print(f"compile {case.kernel} [{case.label}]", file=sys.stderr, flush=True)
                    compiled[case.key()] = _sass_row(case, arch, cache)
                rows[case.kernel] = compiled[case.key()]
            plan = threshold_plan(M, n, k, gpu_threshold_config(M, 2), interpreter=False)
            x, W, bias = spec_inputs(p) if label == "random_spec" else real_inputs(p)[:3]
            rep = replay_survivors(x, W, bias, k, plan, MARGIN)
            entry: dict[str, Any] = dict(sae=label, prompts=p, M=M, d=d, n=n, k=k, plan=dict(
                asdict(plan.cfg), MB=plan.MB, NT=plan.NT, NS=plan.NS, step=plan.step, R=plan.R, G=plan.G, CAP=plan.CAP,
                BS=plan.BS), replay=replay_summary(rep, plan), modelled={})
            for gpu in GPUS[arch]:
                m = model_call(rows, plan, rep["counts"], gpu, M, d, n, k)
                eager = model_eager(M, d, n, k, gpu)["total_s"]
                floor = d * n * 2 / gpu.hbm_bytes_s
                us = lambda v: round(float(v) * 1e6, 1)  # noqa: E731
                entry["modelled"][gpu.name] = dict(
                    fused_us=[us(m["total_low_s"]), us(m["total_high_s"])],
                    fused_no_pdl_us=[us(m["total_no_pdl_low_s"]), us(m["total_no_pdl_high_s"])],
                    pdl_overlap_us=us(m["pdl_overlap_s"]),
                    parts_us={part: [us(m[part]["low_s"]), us(m[part]["high_s"])]
                              for part in ("threshold", "filter", "select")},
                    parts_bounds_us={part: {b: us(m[part][b]) for b in ("compute_low_s", "compute_high_s",
                                                                         "hbm_floor_s", "l2_floor_s")}
                                     for part in ("threshold", "filter", "select")},
                    eager_bf16_us=us(eager), w_enc_read_floor_us=us(floor),
                    speedup_over_eager=[round(eager / m["total_high_s"], 2), round(eager / m["total_low_s"], 2)],
                    x_w_enc_floor=[round(m["total_low_s"] / floor, 1), round(m["total_high_s"] / floor, 1)])
            entries.append(entry)
    targets = modelled_targets(entries, arch)
    meta = metadata(torch.device("cpu"))
    meta.update(mode="static (compile + disassemble + replay + model)", triton=triton.__version__,
                note="MODELLED, not measured: sm_%d SASS of kernels compiled without a GPU, a numpy replay of "
                     "thresholds and survivor counts, and an analytic time model" % arch)
    return dict(meta=meta, arch=f"sm_{arch}", command=f"python -m snce_fast.kernels.cost_threshold --arch {arch}",
                gpus=[asdict(g) for g in GPUS[arch]], assumptions=ASSUMPTIONS + REPORT_ASSUMPTIONS[1:],
                kernels=list(compiled.values()), targets_modelled=targets, model=entries)


def table(rep: dict) -> str:
    """Markdown table of the modelled calls (for docs/performance.md)."""
    lines = ["| SAE | prompts | survivors/row mean (max) | overflow rows | GPU | sample / filter / tail µs (modelled, "
             "high) | call µs (modelled) | without PDL µs (modelled) | eager bf16 µs (modelled) | speed-up (modelled) "
             "| × W_enc floor (modelled) |", "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for e in rep["model"]:
        rp = e["replay"]
        for gpu, m in e["modelled"].items():
            parts = " / ".join(f"{m['parts_us'][p][1]:g}" for p in ("threshold", "filter", "select"))
            lines.append(f"| {e['sae']} (n {e['n']}, k {e['k']}) | {e['prompts']} | {rp['survivors_mean']:g} "
                         f"({rp['survivors_max']}) | {rp['overflow_rows']} | {gpu} | {parts} | "
                         f"{m['fused_us'][0]:g}-{m['fused_us'][1]:g} | "
                         f"{m['fused_no_pdl_us'][0]:g}-{m['fused_no_pdl_us'][1]:g} | {m['eager_bf16_us']:g} | "
                         f"{m['speedup_over_eager'][0]:g}-{m['speedup_over_eager'][1]:g}x | "
                         f"{m['x_w_enc_floor'][0]:g}-{m['x_w_enc_floor'][1]:g} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m snce_fast.kernels.cost_threshold",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(GPUS))
    ap.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--no-real", action="store_true", help="skip the real MiniLM SAE (needs its cached files)")
    ap.add_argument("--table", help="print the markdown table of an existing JSON and exit")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("TRITON_INTERPRET=1 is set: the kernels must be compiled, run without it")
    from snce_fast.records.atomic import atomic_write_text

    for arch in args.arch:
        rep = build(arch, use_real=not args.no_real)
        path = os.path.join(args.out_dir, f"cost_threshold_sm{arch}.json")
        os.makedirs(args.out_dir, exist_ok=True)
        atomic_write_text(path, json.dumps(rep, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
        print(table(rep))
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

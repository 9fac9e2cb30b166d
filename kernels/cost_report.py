"""Static cost report of the Triton kernels: what ptxas emits, which paths the encode kernel takes, and a
modelled time per call, with no GPU.

    python -m snce_fast.kernels.cost_report [--arch 90 100] [--out-dir benchmarks/results] [--jobs 2]
                                            [--spec-only] [--no-real]

For each arch it compiles every default launch configuration of `compile_check` (the docs/performance.md
shapes) plus the modelled shapes (bf16 k 64 at 1/16/64/128 prompts of 77 tokens, and the real MiniLM SAE's
shape), disassembles each cubin (`kernels.sass`), and writes `cost_report_sm<arch>.json` with registers,
spills, shared memory, occupancy, tensor-core / wgmma / TMA counts and instructions per loop; for the
modelled encode configs also instructions per path (skip / insert / sort-merge, identified by the branch
structure of the tile loop), a replay of the kernel's path decisions (`replay_encode_decisions`, numpy/torch
on the CPU) on a random SAE at the SPEC shape and on the real MiniLM SAE with real token activations, and a
modelled time per call against the roofline and a modelled eager bf16 forward (`model_*`). Every time here
is MODELLED, not measured: the constants and assumptions are in `GPUS`, `ASSUMPTIONS` and the JSON.
docs/performance.md ("Static cost report") has the table and the command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from .compile_check import ARCHS, PROMPT_TOKENS, Case, cases, compile_binary, encode_case

PROMPTS = (1, 16, 64, 128)
SPEC = dict(d=768, n=32768, k=64)  # docs/performance.md "SD1.x shapes"
REAL_SAE = os.path.expanduser("~/.cache/snce_fast/ablation/saes/n4k_k32_out_coco")
REAL_ACTS = os.path.expanduser("~/.cache/snce_fast/ablation/output/coco_train.f16.npy")


@dataclass(frozen=True)
class GPU:
    """Per-part constants of the model (sources in `source`)."""
    name: str
    sms: int
    clock_hz: float  # the clock the FLOP/s peak is quoted at
    bf16_flops: float  # dense bf16 tensor-core peak
    hbm_bytes_s: float
    l2_bytes_s: float  # L2 -> SM bandwidth (assumed, see source)
    source: str


GPUS = {
    90: [
        GPU("H100 SXM", 132, 1.83e9, 989e12, 3.35e12, 5.5e12,
            "SMs, 989 TFLOP/s dense bf16 and 3.35 TB/s HBM3: NVIDIA H100 datasheet (also snce_fast.benchmarking."
            "PEAKS); 1.83 GHz = 989e12 / (132 SMs x 4096 dense bf16 FLOP/clk/SM), the clock the peak is quoted at; "
            "L2 bandwidth 5.5 TB/s is an assumption (NVIDIA publishes no L2 bandwidth)"),
        GPU("H200", 132, 1.83e9, 989e12, 4.8e12, 5.5e12,
            "as H100 SXM with 4.8 TB/s HBM3e (NVIDIA H200 datasheet, snce_fast.benchmarking.PEAKS); the lent H200 "
            "measured 788 TFLOP/s on an 8192^3 bf16 matmul and 4.3 TB/s device copies (the workplace's device notes)"),
    ],
    100: [
        GPU("B200", 148, 1.85e9, 2.25e15, 8.0e12, 10e12,
            "148 SMs, 2.25 PFLOP/s dense bf16, 8 TB/s HBM3e: NVIDIA B200 datasheet figures, NOT verified here; "
            "the clock is derived as for H100 (8192 FLOP/clk/SM assumed); L2 bandwidth assumed"),
    ],
}
# Resource limits per SM, compute capability 9.0 and 10.0 (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"): 64K 32-bit registers, 64 resident warps, 32 resident blocks,
# 228 KB shared memory (1 KB of it reserved per block); registers are allocated per warp in units of 256.
REGS_PER_SM, REG_UNIT, MAX_WARPS, MAX_CTAS, SMEM_PER_SM, SMEM_RESERVED = 65536, 256, 64, 32, 228 * 1024, 1024
# Warp instructions per clock per SM by pipe, from the Programming Guide's arithmetic-throughput table for
# cc 9.0 (results per clock per SM / 32): 32-bit integer add/compare/min/max/logic/shift/multiply-add 64 -> 2;
# warp shuffle 32 -> 1; shared memory 128 bytes/clk -> 1 (a 32-bit access per lane); everything else is
# bounded by issue: 4 schedulers x 1 instruction per clock.
PIPE_RATE = {"alu": 2.0, "shuffle": 1.0, "shared": 1.0}
ALU_OPS = {"ISETP", "SEL", "LOP3", "IADD3", "SHF", "LEA", "IMNMX", "VIMNMX", "VIMNMX3", "P2R", "R2P", "PRMT",
           "IMAD", "IABS", "VIADD", "FSEL", "FSETP", "FMNMX", "UISETP", "USEL", "ULOP3", "UIADD3"}
ISSUE_RATE = 4.0
DEP_LATENCY = 4  # cycles between dependent ALU issues of one warp (assumed; measured 4 on Volta, Jia et al. 2018)
MMA_SYNC_FRACTION = 0.5  # mma.sync (HMMA) share of the wgmma tensor-core peak on Hopper (assumed)
LAUNCH_S = 2e-6  # per kernel launch, back to back on a stream (assumed; both fused and eager pay it)
EAGER_MM_EFF = 0.75  # cuBLAS bf16 GEMM share of peak at these skinny shapes (assumed; 0.80 measured at 8192^3)
BW_EFF = 0.80  # share of HBM bandwidth a streaming kernel reaches (assumed; 0.9 measured for copies)
TOPK_PASSES = 3  # torch.topk on [M, n] 16-bit: two 8-bit radix-select passes + one gather pass (assumed)
ASSUMPTIONS = [
    "modelled, not measured: no kernel here has run on a GPU",
    "cycles of an SM = max(issue bound, busiest pipe bound, tensor-core bound): issue bound = warp instructions / "
    f"({ISSUE_RATE:g} x e); e = 1 (low estimate) or min(1, resident warps / ({ISSUE_RATE:g} x {DEP_LATENCY})) "
    f"(high estimate: each warp issues one instruction every {DEP_LATENCY} cycles); pipe rates {PIPE_RATE} "
    "warp instructions/clk/SM; tensor-core bound = the SM's MMA FLOPs / (peak per SM x fraction), fraction 1 "
    f"for wgmma/tcgen05 and {MMA_SYNC_FRACTION} for mma.sync (HMMA)",
    "warp instructions of a program = prologue/epilogue + sum over its tiles of the path it takes (skip, insert "
    "or sort-merge, from the replay) with the MMA loop x ceil(d / BK) and the insertion loop x the replayed "
    "insertions; times the program's warps",
    "occupancy: resident programs per SM = min(64K registers / (ceil(regs x 32 / 256) x 256 x warps), 228 KB / "
    "(shared + 1 KB), 64 warps / warps, 32); programs are dealt in launch order to the SM with the least work "
    "so far (list scheduling); kernel time = max over SMs, then at least the HBM floor (W_enc once, x, outputs) "
    "and the L2 floor (W_enc once per row block, assuming repeats hit L2)",
    f"launches: {LAUNCH_S * 1e6:g} us each; tail ops of the fused call counted by TorchDispatchMode with the "
    "Triton launch stubbed (views and allocations not counted)",
    f"eager bf16 = matmul (cuBLAS at {EAGER_MM_EFF} of peak, or its bytes at {BW_EFF} of HBM, whichever is "
    f"slower) + bias add + ReLU (each reads and writes M x n bf16) + torch.topk ({TOPK_PASSES} passes over M x n "
    f"bf16) + the (x - b_dec) subtraction; {BW_EFF} of HBM for every streaming pass; 5 launches",
]


# ---------------------------------------------------------------------------------------------- compile
def _case_work(case: Case, arch: int, cache_dir: Optional[str], detail: bool) -> dict:
    """Compile, disassemble and analyse one case (in a worker process)."""
    from . import sass
    from .compile_check import _ptxas_resources

    row: dict[str, Any] = dict(kernel=case.kernel, label=case.label, arch=f"sm_{arch}", num_warps=case.num_warps,
                               num_stages=case.num_stages)
    t0 = time.perf_counter()
    try:
        compiled, log = compile_binary(case, arch, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - reported in the row
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        row.update(ok=False, error=f"{type(e).__name__}: {last}"[:400])
        return row
    res = _ptxas_resources(log)
    an = sass.analyse(sass.disassemble(compiled.asm["cubin"]))
    counts = an.counts()
    row.update(ok=True, reg=res.get("reg"), stack=res.get("stack", 0), spill_stores=res.get("spill_stores", 0),
               spill_loads=res.get("spill_loads", 0), shared_bytes=int(compiled.metadata.shared),
               tensor_cores_expected=case.tensor_cores, spill_allowed=case.spill_allowed,
               sass=dict(instructions=counts["instructions"], tensor_core=counts["tensor_core"], tma=counts["tma"],
                         wgmma=counts["wgmma"], spill_instructions=counts["spill_instructions"], mix=counts["mix"]),
               loops=an.loop_table(),
               occupancy=occupancy(res.get("reg") or 255, case.num_warps, int(compiled.metadata.shared)))
    if detail:
        row["paths"] = classify_paths(an)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def classify_paths(an: Any) -> dict:
    """Per-iteration instruction counts of the encode kernel's tile loop by path.

    The MMA loop is the inner loop with the most tensor-core (or FFMA) instructions; only paths that enter it
    are real tiles. Of those: `skip` is the shortest path entering no other inner loop (no candidate in the
    tile), `sort` the longest (the bitonic tile sort + merge: SEL/ISETP/SHFL/BAR), `insert` the path that enters
    another inner loop (the one-at-a-time insertion `while`). Counts are per warp, inner-loop bodies excluded
    (`mma_loop` and `insert_loop` give them per iteration)."""
    paths = an.outer_paths()
    if not paths:
        return dict(error="no loop found in the SASS")
    outer = max((lp for lp in an.loops if lp.depth == 0), key=lambda lp: lp.latch - lp.head)
    inner = sorted({j for p in paths for j in p.loops})

    def mma_weight(j: int) -> int:
        lp = an.loops[j]
        ops = [i.op for i in an.instrs[lp.head:lp.latch + 1]]
        return 1000 * sum(i.cls == "tensor_core" for i in an.instrs[lp.head:lp.latch + 1]) + ops.count("FFMA")

    mma = max(inner, key=mma_weight) if inner else None
    real = [p for p in paths if mma is None or mma in p.loops]
    others = [j for j in inner if j != mma]
    plain = [p for p in real if not set(p.loops) - {mma}]
    out: dict[str, Any] = dict(
        tile_loop=dict(head=f"0x{an.instrs[outer.head].addr:x}", latch=f"0x{an.instrs[outer.latch].addr:x}"),
        outside_tile_loop=len(an.instrs) - (outer.latch - outer.head + 1),
        n_paths=len(paths))
    if mma is not None:
        lp = an.loops[mma]
        out["mma_loop"] = dict(instructions=lp.latch - lp.head + 1, mix=an.loop_mix(mma),
                               tensor_core=sum(i.cls == "tensor_core" for i in an.instrs[lp.head:lp.latch + 1]),
                               ffma=sum(i.op == "FFMA" for i in an.instrs[lp.head:lp.latch + 1]))
    if others:
        j = max(others, key=lambda j: an.loops[j].latch - an.loops[j].head)
        lp = an.loops[j]
        out["insert_loop"] = dict(instructions=lp.latch - lp.head + 1, mix=an.loop_mix(j))
    named = {}
    if plain:
        named["skip"] = min(plain, key=lambda p: p.instructions)
    if real:
        named["sort"] = max(real, key=lambda p: p.instructions)
    ins = [p for p in real if set(p.loops) - {mma}]
    if ins:
        named["insert"] = max(ins, key=lambda p: p.instructions)
    out["paths"] = {k: dict(instructions=p.instructions, mix=p.mix) for k, p in named.items()}
    out["alu_ops"] = {k: sum(1 for b in p.blocks for i in an.instrs[an.blocks[b].start:an.blocks[b].end]
                             if i.op in ALU_OPS) for k, p in named.items()}
    if mma is not None:
        lp = an.loops[mma]
        out["mma_loop"]["alu_ops"] = sum(i.op in ALU_OPS for i in an.instrs[lp.head:lp.latch + 1])
    if others:
        lp = an.loops[max(others, key=lambda j: an.loops[j].latch - an.loops[j].head)]
        out["insert_loop"]["alu_ops"] = sum(i.op in ALU_OPS for i in an.instrs[lp.head:lp.latch + 1])
    return out


def occupancy(regs: int, warps: int, shared: int) -> dict:
    """Resident programs (CTAs) per SM and what limits them (see REGS_PER_SM & co.)."""
    per_warp = math.ceil(regs * 32 / REG_UNIT) * REG_UNIT
    lim = dict(registers=REGS_PER_SM // (per_warp * warps), shared=SMEM_PER_SM // (shared + SMEM_RESERVED),
               warps=MAX_WARPS // warps, blocks=MAX_CTAS)
    ctas = min(lim.values())
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * warps, limited_by=min(lim, key=lim.get))


def compile_all(work: list[tuple[Case, int, bool]], jobs: int, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="snce_cost_report_") as cache:
        bar = tqdm(total=len(work), desc="compile + disassemble", disable=not progress)
        out = []
        if jobs <= 1:
            for c, a, det in work:
                out.append(_case_work(c, a, cache, det))
                bar.update()
        else:
            with ProcessPoolExecutor(jobs) as pool:
                for r in pool.map(_case_work, [w[0] for w in work], [w[1] for w in work], [cache] * len(work),
                                  [w[2] for w in work]):
                    out.append(r)
                    bar.update()
        bar.close()
    return out


# ---------------------------------------------------------------------------------------------- replay
def replay_encode_decisions(x: np.ndarray, W: np.ndarray, bias: np.ndarray, k: int, BM: int, BN: int,
                            splits: int, chunk: int, few: int, sentinel_bug: bool = True) -> dict:
    """Replay `_encode_topk_kernel`'s per-tile branch decisions (kernels/encode_topk.py as of this report).

    Per program (row block of BM rows x split of `chunk` latents) and per BN-wide tile, in the kernel's order:
    `pre = x @ W[:, tile] + bias` (fp32 of the given, already rounded inputs), candidates `pre > thr_v` per row,
    `n_cand` = the most candidates of any valid row of the block; 0 -> skip, 1..few -> insert (the `while`
    runs once per insertion of the row with the most insertions), > few -> sort (tile top-KP + merge). The
    running top-KP is then the exact top-KP of (top, candidates) and `thr_v` its smallest value, which today's
    `_key_value` turns into -inf when it is <= -2.0 (`sentinel_bug`: the `key < -(2**62)` test) or a sentinel.
    Returns path codes [row_blocks, splits, tiles] (-1 no tile, 0 skip, 1 insert, 2 sort) and insertions.
    If the kernel's selection changes, change this function with it."""
    import torch

    M, n = x.shape[0], W.shape[1]
    KP = 1 << max(0, (k - 1).bit_length())
    rb = -(-M // BM)
    tiles = -(-chunk // BN)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    Wt = torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32))
    bt = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    top = torch.full((M, splits, KP), -math.inf)
    thr = torch.full((M, splits), -math.inf)
    codes = np.full((rb, splits, tiles), -1, dtype=np.int8)
    inserts = np.zeros((rb, splits, tiles), dtype=np.int32)
    pad = rb * BM - M
    for t in range(tiles):
        starts = [s * chunk + t * BN for s in range(splits)]
        live = [s for s in range(splits) if starts[s] < min(s * chunk + chunk, n)]
        if not live:
            continue
        cols = torch.cat([torch.arange(starts[s], starts[s] + BN) for s in live])
        ends = torch.tensor([min(s * chunk + chunk, n) for s in live]).repeat_interleave(BN)
        valid = cols < ends
        colc = cols.clamp(max=n - 1)
        pre = (xt @ Wt[:, colc] + bt[colc]).reshape(M, len(live), BN)
        pre = torch.where(valid.reshape(1, len(live), BN), pre, torch.tensor(-math.inf))
        li = torch.tensor(live)
        cand = (pre > thr[:, li, None]) & valid.reshape(1, len(live), BN)
        cnt = cand.sum(-1)  # [M, live]
        vals = torch.where(cand, pre, torch.tensor(-math.inf))
        merged = torch.cat([top[:, li], vals], -1).topk(KP, dim=-1).values
        new_thr = merged[..., -1]
        accepted = (cand & (pre >= new_thr[..., None])).sum(-1)
        top[:, li] = merged
        t_v = new_thr.clone()
        if sentinel_bug:
            t_v = torch.where(t_v <= -2.0, torch.tensor(-math.inf), t_v)
        thr[:, li] = t_v
        cnt_b = torch.nn.functional.pad(cnt, (0, 0, 0, pad)).reshape(rb, BM, len(live)).amax(1).numpy()
        acc_b = torch.nn.functional.pad(accepted, (0, 0, 0, pad)).reshape(rb, BM, len(live)).amax(1).numpy()
        code = np.where(cnt_b == 0, 0, np.where(cnt_b <= few, 1, 2))
        codes[:, live, t] = code
        inserts[:, live, t] = np.where(code == 1, acc_b, 0)
    return dict(codes=codes, inserts=inserts)


def replay_summary(rep: dict) -> dict:
    c, ins = rep["codes"], rep["inserts"]
    real = c >= 0
    tot = int(real.sum())
    frac = {name: round(float((c == v).sum()) / tot, 4) for v, name in ((0, "skip"), (1, "insert"), (2, "sort"))}
    return dict(program_tiles=tot, fraction=frac,
                mean_insertions_per_insert_tile=round(float(ins[c == 1].mean()), 2) if (c == 1).any() else 0.0,
                sort_tiles_busiest_program=int((c == 2).sum(-1).max()))


# ---------------------------------------------------------------------------------------------- model
def _warp_instr(paths: dict, d: int, BK: int, rep: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(warp instructions per warp, ALU ops, [shuffle, shared] ops) per program from the replayed paths."""
    P = paths["paths"]
    mma = paths.get("mma_loop", {})
    ins_loop = paths.get("insert_loop", dict(instructions=0, alu_ops=0, mix={}))
    trips = -(-d // BK)
    codes, inserts = rep["codes"], rep["inserts"]
    per = {}
    for name in ("skip", "insert", "sort"):
        p = P.get(name, P.get("sort"))
        per[name] = np.array([p["instructions"], paths["alu_ops"].get(name, 0),
                              p["mix"].get("shuffle", 0), p["mix"].get("shared_mem", 0)], dtype=np.float64)
    base = np.array([mma.get("instructions", 0), mma.get("alu_ops", 0), mma.get("mix", {}).get("shuffle", 0),
                     mma.get("mix", {}).get("shared_mem", 0)], dtype=np.float64) * trips
    loop = np.array([ins_loop["instructions"], ins_loop.get("alu_ops", 0), ins_loop["mix"].get("shuffle", 0),
                     ins_loop["mix"].get("shared_mem", 0)], dtype=np.float64)
    tot = np.zeros(codes.shape[:2] + (4,))
    for v, name in ((0, "skip"), (1, "insert"), (2, "sort")):
        m = (codes == v)
        tot += m.sum(-1)[..., None] * (per[name] + base)[None, None, :]
    tot += inserts.sum(-1)[..., None] * loop[None, None, :]
    tot[..., 0] += paths["outside_tile_loop"]
    return tot[..., 0], tot[..., 1], tot[..., 2:]


def model_kernel(row: dict, rep: dict, gpu: GPU, M: int, d: int, n: int, KP: int, BM: int, BN: int, BK: int,
                 splits: int) -> dict:
    """Modelled kernel time (low, high) in seconds for one launch; see ASSUMPTIONS."""
    W = row["num_warps"]
    instr, alu, other = _warp_instr(row["paths"], d, BK, rep)
    rb = instr.shape[0]
    occ = row["occupancy"]["ctas_per_sm"]
    tc = row["sass"]["tensor_core"]
    frac = 1.0 if (row["sass"]["wgmma"] or any(op.startswith("UTC") for op in tc)) else MMA_SYNC_FRACTION
    flops_prog = np.zeros((rb, splits))
    ntiles = (rep["codes"] >= 0).sum(-1)
    flops_prog += 2.0 * BM * BN * d * ntiles
    peak_sm = gpu.bf16_flops / gpu.sms / gpu.clock_hz * (frac if tc else 1 / 16)  # no MMA: FFMA, ~1/16 (assumed)
    # deal programs in launch order (pid 0 fastest) to the SM with the least issue work so far
    sm_of = np.zeros((rb, splits), dtype=np.int64)
    load = np.zeros(gpu.sms)
    for s_ in range(splits):
        for i in range(rb):
            j = int(np.argmin(load))
            sm_of[i, s_] = j
            load[j] += instr[i, s_]
    res = {}
    for est in ("low", "high"):
        worst = 0.0
        for j in np.unique(sm_of):
            sel = sm_of == j
            resident = min(occ, int(sel.sum())) * W
            e = 1.0 if est == "low" else min(1.0, resident / (ISSUE_RATE * DEP_LATENCY))
            cyc = max(instr[sel].sum() * W / (ISSUE_RATE * e), alu[sel].sum() * W / PIPE_RATE["alu"],
                      other[sel][:, 0].sum() * W / PIPE_RATE["shuffle"],
                      other[sel][:, 1].sum() * W / PIPE_RATE["shared"], flops_prog[sel].sum() / peak_sm)
            worst = max(worst, cyc)
        res[est] = worst / gpu.clock_hz
    hbm = (d * n * 2 + M * d * 2 + M * splits * KP * 8 + n * 4) / gpu.hbm_bytes_s
    l2 = rb * d * n * 2 / gpu.l2_bytes_s
    return dict(compute_low_s=res["low"], compute_high_s=res["high"], hbm_floor_s=hbm, l2_floor_s=l2,
                kernel_low_s=max(res["low"], hbm, l2), kernel_high_s=max(res["high"], hbm, l2),
                mma_fraction=frac, programs=rb * splits)


def model_tail(M: int, k: int, KP: int, splits: int, launches: int, gpu: GPU) -> float:
    """The fused call after the kernel: the merge kernel over [M, splits x KP] int64 keys (TOPK_PASSES reads of
    them) and `launches` launches (the merge kernel's one since it replaced torch.topk and the unpack ops)."""
    keys = M * splits * KP * 8
    return launches * LAUNCH_S + TOPK_PASSES * keys / (gpu.hbm_bytes_s * BW_EFF)


def model_eager(M: int, d: int, n: int, k: int, gpu: GPU) -> dict:
    """Modelled eager bf16: (x - b_dec) @ W_enc + b_enc, ReLU, torch.topk (benchmarks/bench_encode_topk.py's
    `eleuther_encode`, the bar of docs/performance.md)."""
    bw = gpu.hbm_bytes_s * BW_EFF
    mm = max(2 * M * d * n / (gpu.bf16_flops * EAGER_MM_EFF), (d * n + M * d + M * n) * 2 / bw)
    sub = 2 * M * d * 2 / bw
    add = relu = 2 * M * n * 2 / bw
    topk = TOPK_PASSES * M * n * 2 / bw + M * k * 10 / bw
    parts = dict(sub=sub, matmul=mm, bias_add=add, relu=relu, topk=topk, launches=5 * LAUNCH_S)
    return dict(total_s=sum(parts.values()), **{f"{k_}_s": v for k_, v in parts.items()})


def count_tail_launches() -> tuple[int, list[str]]:
    """(launches of one `kernels.encode` call, those besides the encode kernel): aten ops (kernel launches on a
    GPU), counted with TorchDispatchMode on CPU tensors, and the module's Triton launches (the encode kernel, the
    merge kernel), every launch stubbed; views and allocations are not launches."""
    code = r"""
import os, torch
os.environ["TRITON_INTERPRET"] = "0"  # triton_op: a dispatch mode sees the ops inside it
from torch.utils._python_dispatch import TorchDispatchMode
from snce_fast import kernels
import sys
et = sys.modules["snce_fast.kernels.encode_topk"]  # the package re-exports a function of the same name
from snce_fast.sae import SAE
FREE = ("view", "_unsafe_view", "alias", "as_strided", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice",
        "select", "detach", "empty", "empty_like", "new_empty", "_reshape_alias", "reshape", "permute", "lift_fresh",
        "empty_strided", "clone_if_view", "sym_size", "sym_stride", "sym_numel", "is_same_size", "_to_copy_noop")
calls = []
class _Stub:  # every Triton launch of the module is counted, not run (no GPU driver here)
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        return lambda *a, **kw: calls.append(getattr(self.kernel, "__name__", str(self.kernel)))
et.wrap_triton = _Stub
pkg = sys.modules["snce_fast.kernels"]
for name in dir(pkg):  # call the registered ops' Python bodies, so that the mode sees the ops inside them
    fn = getattr(pkg, name)
    if hasattr(fn, "_init_fn") and str(getattr(fn, "_qualname", "")).startswith("snce_fast::"):
        setattr(pkg, name, fn._init_fn)
sae = SAE.random(64, 1024, 64).to(torch.bfloat16)
x = torch.randn(77, 64).to(torch.bfloat16)
kernels.encode(x, sae)  # warm: the folded bias is cached after the first call
calls.clear()
class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.ops = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in FREE and not str(func).startswith("snce_fast"):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))
with Count() as c:
    kernels.encode(x, sae)
print(len(c.ops) + len(calls), ",".join(c.ops + calls[1:]))  # every launch; calls[0] is the encode kernel itself
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TRITON_INTERPRET="0"))
    if out.returncode != 0:
        raise RuntimeError(f"counting the fused call's launches failed: {out.stderr.strip()[-500:]}")
    n, ops = out.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(n), ops.split(",")


# ---------------------------------------------------------------------------------------------- inputs
def spec_inputs(prompts: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The benchmark's random SAE and randn x, rounded to bf16. The weights are drawn in the order of
    snce_fast.sae.SAE.random(d, n, k, seed, enc_bias_std=0.05) (unit decoder rows, W_enc = W_dec^T, normal
    biases), so they are the same values; built here because the kernels room may not import the sae room."""
    import torch

    from snce_fast.ops.reference import folded_encoder_bias

    d, n = SPEC["d"], SPEC["n"]
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(n, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b_enc = torch.randn(n, generator=g) * 0.05
    b_dec = torch.randn(d, generator=g) * 0.1
    W_enc, b_enc, b_dec = (t.to(torch.bfloat16) for t in (w_dec.t().contiguous(), b_enc, b_dec))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(prompts * PROMPT_TOKENS, d, generator=g).to(torch.bfloat16)
    bias = folded_encoder_bias(W_enc, b_enc, b_dec)
    return x.float().numpy(), W_enc.float().numpy(), bias.detach().numpy()


def real_inputs(prompts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The MiniLM SAE (n 4096, k 32, hook output; its sae.safetensors and config.json read directly) and the
    first prompts x 77 cached real MiniLM token activations of COCO training captions (BOS and padding
    excluded, captions concatenated), all rounded to bf16."""
    import json

    import torch
    from safetensors.torch import load_file

    from snce_fast.ops.reference import folded_encoder_bias

    weights = {name: t.to(torch.bfloat16) for name, t in load_file(os.path.join(REAL_SAE, "sae.safetensors")).items()}
    with open(os.path.join(REAL_SAE, "config.json")) as f:
        k = int(json.load(f)["k"])
    acts = np.load(REAL_ACTS, mmap_mode="r")
    M = prompts * PROMPT_TOKENS
    if acts.shape[0] < M:
        raise ValueError(f"{REAL_ACTS} has {acts.shape[0]} tokens: expected at least {M}")
    x = torch.from_numpy(np.array(acts[:M], dtype=np.float32)).to(torch.bfloat16)
    bias = folded_encoder_bias(weights["W_enc"], weights["b_enc"], weights["b_dec"])
    return x.float().numpy(), weights["W_enc"].float().numpy(), bias.detach().numpy(), k


# ---------------------------------------------------------------------------------------------- report
def modelled_cases(arch: int, real: Optional[tuple[int, int, int]]) -> list[tuple[str, int, Case]]:
    """(sae label, prompts, case) of the modelled encode launches: bf16 SPEC shape, and the real SAE's shape."""
    import torch

    out = []
    for p in PROMPTS:
        out.append(("random_spec", p, encode_case(arch, torch.bfloat16, torch.bfloat16, SPEC["k"], p * PROMPT_TOKENS,
                                                  n=SPEC["n"], d=SPEC["d"])[0]))
        if real:
            d, n, k = real
            out.append(("real_minilm", p, encode_case(arch, torch.bfloat16, torch.bfloat16, k, p * PROMPT_TOKENS,
                                                      n=n, d=d)[0]))
    return out


def build(arch: int, jobs: int, spec_only: bool, use_real: bool, progress: bool = True) -> dict:
    import torch

    from ._tuning import EncodeConfig, next_pow2, split_plan  # noqa: F401

    real_shape = None
    if use_real:
        if not (os.path.isdir(REAL_SAE) and os.path.exists(REAL_ACTS)):
            raise FileNotFoundError(f"real SAE or activations missing ({REAL_SAE}, {REAL_ACTS}): run "
                                    "experiments/ablate_identification.py first, or pass --no-real")
        cfg = json.load(open(os.path.join(REAL_SAE, "config.json")))
        real_shape = (cfg["d_in"], cfg["n_latents"], cfg["k"])
    mcases = modelled_cases(arch, real_shape)
    work, keys = [], {}
    for _, _, c in mcases:
        if c.key() not in keys:
            keys[c.key()] = len(work)
            work.append((c, arch, True))
    if not spec_only:
        for c in cases(arch):
            if c.key() not in keys:
                keys[c.key()] = len(work)
                work.append((c, arch, False))
    rows = compile_all(work, jobs, progress)
    tail_n, tail_ops = count_tail_launches()
    models = []
    for sae_label, p, c in mcases:
        row = rows[keys[c.key()]]
        M = p * PROMPT_TOKENS
        if sae_label == "random_spec":
            x, W, bias = spec_inputs(p)
            d, n, k = SPEC["d"], SPEC["n"], SPEC["k"]
        else:
            x, W, bias, k = real_inputs(p)
            d, n = W.shape
        KP = next_pow2(k)
        ce = c.constexprs
        cfg = EncodeConfig(BM=ce["BM"], BN=ce["BN"], BK=ce["BK"], FEW=ce["FEW"], num_warps=c.num_warps,
                           num_stages=c.num_stages)
        splits, chunk = split_plan(M, n, cfg, ARCHS[arch][1])
        entry: dict[str, Any] = dict(sae=sae_label, prompts=p, M=M, d=d, n=n, k=k, config=c.label,
                                     compiled_as=row["label"], splits=splits,
                                     chunk=chunk, reg=row.get("reg"), occupancy=row.get("occupancy"),
                                     paths=row.get("paths"))
        if not row.get("ok") or "paths" not in row or "error" in row["paths"]:
            entry["error"] = row.get("error") or row.get("paths", {}).get("error")
            models.append(entry)
            continue
        rep = replay_encode_decisions(x, W, bias, k, cfg.BM, cfg.BN, splits, chunk, cfg.FEW, sentinel_bug=True)
        rep_fixed = replay_encode_decisions(x, W, bias, k, cfg.BM, cfg.BN, splits, chunk, cfg.FEW, sentinel_bug=False)
        entry["replay"] = replay_summary(rep)
        entry["replay_without_sentinel_bug"] = replay_summary(rep_fixed)
        entry["modelled"] = {}
        for gpu in GPUS[arch]:
            kern = model_kernel(row, rep, gpu, M, d, n, KP, cfg.BM, cfg.BN, cfg.BK, splits)
            # the same kernel if every tile took the skip path: what the MMA loop, tiles and occupancy cost alone
            no_sel = dict(codes=np.where(rep["codes"] >= 0, 0, -1), inserts=np.zeros_like(rep["inserts"]))
            kern0 = model_kernel(row, no_sel, gpu, M, d, n, KP, cfg.BM, cfg.BN, cfg.BK, splits)
            tail = model_tail(M, k, KP, splits, tail_n - 1, gpu)
            eager = model_eager(M, d, n, k, gpu)
            floor = d * n * 2 / gpu.hbm_bytes_s
            roof = max(2 * M * d * n / gpu.bf16_flops, (d * n + M * d) * 2 / gpu.hbm_bytes_s)
            lo = kern["kernel_low_s"] + LAUNCH_S + tail
            hi = kern["kernel_high_s"] + LAUNCH_S + tail
            us = lambda v: round(float(v) * 1e6, 1)  # noqa: E731
            entry["modelled"][gpu.name] = dict(
                fused_us=[us(lo), us(hi)], kernel_us=[us(kern["kernel_low_s"]), us(kern["kernel_high_s"])],
                kernel_compute_us=[us(kern["compute_low_s"]), us(kern["compute_high_s"])],
                kernel_if_every_tile_skipped_us=[us(kern0["kernel_low_s"]), us(kern0["kernel_high_s"])],
                kernel_hbm_floor_us=us(kern["hbm_floor_s"]), kernel_l2_floor_us=us(kern["l2_floor_s"]),
                tail_us=us(tail), eager_bf16_us=us(eager["total_s"]),
                eager_parts_us={k_.removesuffix("_s"): us(v) for k_, v in eager.items() if k_ != "total_s"},
                roofline_us=us(roof), w_enc_read_floor_us=us(floor),
                speedup_over_eager=[round(float(eager["total_s"] / hi), 2), round(float(eager["total_s"] / lo), 2)],
                x_w_enc_floor=[round(float(lo / floor), 1), round(float(hi / floor), 1)],
                mma_fraction=kern["mma_fraction"])
        models.append(entry)
    targets = modelled_targets(models, arch)
    import triton

    from snce_fast.records.run_info import metadata

    meta = metadata(torch.device("cpu"))
    meta.update(mode="static (compile + disassemble + model)", triton=triton.__version__,
                note="MODELLED, not measured: ptxas/nvdisasm output of kernels compiled for sm_%d without a GPU, "
                     "a CPU replay of the encode kernel's branch decisions and an analytic time model" % arch)
    return dict(meta=meta, arch=f"sm_{arch}", command=f"python -m snce_fast.kernels.cost_report --arch {arch}",
                gpus=[asdict(g) for g in GPUS[arch]],
                constants=dict(REGS_PER_SM=REGS_PER_SM, REG_UNIT=REG_UNIT, MAX_WARPS=MAX_WARPS, MAX_CTAS=MAX_CTAS,
                               SMEM_PER_SM=SMEM_PER_SM, PIPE_RATE=PIPE_RATE, ISSUE_RATE=ISSUE_RATE,
                               DEP_LATENCY=DEP_LATENCY, MMA_SYNC_FRACTION=MMA_SYNC_FRACTION, LAUNCH_S=LAUNCH_S,
                               EAGER_MM_EFF=EAGER_MM_EFF, BW_EFF=BW_EFF, TOPK_PASSES=TOPK_PASSES),
                assumptions=ASSUMPTIONS, fused_call_launches=dict(count=tail_n, aten_ops=tail_ops),
                targets_modelled=targets, encode_model=models, configs=rows)


def modelled_targets(entries: list[dict], arch: int) -> dict:
    """Per GPU of `arch`, the issue's modelled targets read off the random SPEC SAE's entries: speed-up over
    eager bf16 at 16 prompts (>= 2x at the pessimistic end) and x the W_enc floor at one prompt (<= 3x)."""
    targets = {}
    for gpu in GPUS[arch]:
        t = {}
        for e in entries:
            if e["sae"] != "random_spec" or "modelled" not in e:
                continue
            m = e["modelled"][gpu.name]
            if e["prompts"] == 16:
                t["16_prompts_speedup_over_eager_modelled"] = m["speedup_over_eager"]
                t["16_prompts_met (>= 2x)"] = bool(m["speedup_over_eager"][0] >= 2)
            if e["prompts"] == 1:
                t["1_prompt_x_w_enc_floor_modelled"] = m["x_w_enc_floor"]
                t["1_prompt_met (<= 3x)"] = bool(m["x_w_enc_floor"][1] <= 3)
        targets[gpu.name] = t
    return targets


def table(rep: dict) -> str:
    """Markdown table of the modelled encode times (for docs/performance.md)."""
    lines = ["| SAE | prompts | config | regs / CTAs per SM | sort / insert / skip tiles | GPU | fused (modelled) µs "
             "| eager bf16 (modelled) µs | speed-up (modelled) | × W_enc floor (modelled) "
             "| kernel if no tile selected anything (modelled) µs |",
             "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|"]
    for e in rep["encode_model"]:
        if "modelled" not in e:
            lines.append(f"| {e['sae']} | {e['prompts']} | {e['config']} | error: {e.get('error')} ||||||||")
            continue
        f = e["replay"]["fraction"]
        for g, m in e["modelled"].items():
            lines.append(
                f"| {e['sae']} (d {e['d']}, n {e['n']}, k {e['k']}) | {e['prompts']} | {e['config'].split(' BM')[1]} "
                f"| {e['reg']} / {e['occupancy']['ctas_per_sm']} | {f['sort']:.0%} / {f['insert']:.0%} / "
                f"{f['skip']:.0%} | {g} | {m['fused_us'][0]:g}-{m['fused_us'][1]:g} | {m['eager_bf16_us']:g} | "
                f"{m['speedup_over_eager'][0]:g}-{m['speedup_over_eager'][1]:g}× | "
                f"{m['x_w_enc_floor'][0]:g}-{m['x_w_enc_floor'][1]:g}× | "
                + ("-".join(f"{v:g}" for v in m["kernel_if_every_tile_skipped_us"])
                   if "kernel_if_every_tile_skipped_us" in m else "-") + " |")
    return "\n".join(lines)


def _row_for(rep: dict, e: dict) -> dict:
    """The compiled config row of a modelled entry (launches that specialise alike share one compile)."""
    import re

    label = e.get("compiled_as", e["config"])
    strip = lambda s: re.sub(r" M\d+ ", " ", s)  # noqa: E731
    return next((r for r in rep["configs"] if r["label"] == label), None) or next(
        r for r in rep["configs"] if r["kernel"] == "encode_topk" and strip(r["label"]) == strip(label)
        and "paths" in r)


def paths_table(rep: dict) -> str:
    """Markdown table of the modelled encode configs' SASS: resources, tensor-core / TMA instructions and
    instructions per warp per path (for docs/performance.md)."""
    lines = ["| arch | shape | config | regs | CTAs/SM | shared KB | tensor-core ops | TMA ops | MMA loop: instr "
             "(MMA) per BK step | skip tile | insert tile (+ per insertion) | sort tile (SEL+ISETP / SHFL / BAR) |",
             "|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    seen = set()
    for e in rep["encode_model"]:
        if not e.get("paths") or "paths" not in e["paths"]:
            continue
        key = e.get("compiled_as", e["config"]) if "compiled_as" in e else _row_for(rep, e)["label"]
        if key in seen:
            continue
        seen.add(key)
        row = _row_for(rep, e)
        pa, mm, ins = e["paths"]["paths"], e["paths"].get("mma_loop", {}), e["paths"].get("insert_loop", {})
        srt = pa.get("sort", {}).get("mix", {})
        lines.append(
            f"| {rep['arch']} | {e['config'].split(' BM')[0]} | BM{e['config'].split(' BM')[1]} | {row['reg']} | "
            f"{row['occupancy']['ctas_per_sm']} | {row['shared_bytes'] / 1024:.0f} | "
            f"{', '.join(f'{k} {v}' for k, v in row['sass']['tensor_core'].items()) or 'none'} | "
            f"{', '.join(f'{k} {v}' for k, v in row['sass']['tma'].items()) or 'none'} | "
            f"{mm.get('instructions', 0)} ({mm.get('tensor_core', 0)}) | "
            f"{pa.get('skip', {}).get('instructions', '-')} | "
            f"{pa.get('insert', {}).get('instructions', '-')} (+{ins.get('instructions', 0)}) | "
            f"{pa.get('sort', {}).get('instructions', '-')} ({srt.get('select_compare', 0)} / "
            f"{srt.get('shuffle', 0)} / {srt.get('barrier', 0)}) |")
    return "\n".join(lines)


def gate_summary(rep: dict) -> str:
    """`compile_check.gate` over every config of the report, plus the spills it allows."""
    from .compile_check import gate

    rows = rep["configs"]
    problems = gate(rows)
    allowed = [r for r in rows if r.get("ok") and r.get("spill_allowed") and r.get("spill_stores", 0)]
    out = [f"{rep['arch']}: {len(rows)} configs, {len(problems)} fail the gate, {len(allowed)} spill where the "
           f"table says no tile fits (allowed: {', '.join(sorted({r['label'] for r in allowed})) or 'none'})"]
    out += [f"  GATE FAIL {p}" for p in problems]
    return "\n".join(out)


def _plain(o: Any) -> Any:
    """numpy scalars -> Python (json.dumps `default`)."""
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m snce_fast.kernels.cost_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 100], choices=sorted(GPUS))
    ap.add_argument("--out-dir", default="benchmarks/results", help="writes cost_report_sm<arch>.json there")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--spec-only", action="store_true",
                    help="only the modelled encode configs, not every default config of compile_check")
    ap.add_argument("--no-real", action="store_true", help="skip the real MiniLM SAE (needs its cached files)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--tables", nargs="+", metavar="JSON", help="only print the markdown tables of written reports")
    args = ap.parse_args(argv)
    if args.tables:
        for f in args.tables:
            try:
                rep = json.load(open(f))
            except (OSError, ValueError) as e:
                print(f"error: cannot read report {f}: {e}", file=sys.stderr)
                return 2
            print(f"## {f}\n\n{table(rep)}\n\n{paths_table(rep)}\n\n{gate_summary(rep)}\n")
            print("targets (modelled):", json.dumps(rep["targets_modelled"]))
        return 0
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # jit functions made under the interpreter cannot compile
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.call([sys.executable, "-m", "snce_fast.kernels.cost_report",
                                *(sys.argv[1:] if argv is None else argv)], env=env)
    if not args.no_real and not (os.path.isdir(REAL_SAE) and os.path.exists(REAL_ACTS)):
        print(f"error: real SAE or activations missing ({REAL_SAE}, {REAL_ACTS}): pass --no-real", file=sys.stderr)
        return 2
    from snce_fast.records.atomic import atomic_write_text

    bad = 0
    for arch in args.arch:
        rep = build(arch, args.jobs, args.spec_only, not args.no_real, progress=not args.quiet)
        path = os.path.join(args.out_dir, f"cost_report_sm{arch}.json")
        os.makedirs(args.out_dir, exist_ok=True)
        atomic_write_text(path, json.dumps(rep, indent=1, default=_plain))
        print(f"sm_{arch}: wrote {path}")
        print(table(rep))
        print(paths_table(rep))
        print(gate_summary(rep))
        print("targets (modelled):", json.dumps(rep["targets_modelled"]))
        bad += sum(not r.get("ok") for r in rep["configs"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

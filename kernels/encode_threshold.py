"""The "threshold" selection of the fused TopK encode (docs/kernels.md, "Threshold selection"): no sorting
inside the matmul, Hopper-sized tiles, three launches.

1. `_threshold_kernel`, on one latent tile in `step` (STRIDE = 4 where there are enough tiles; fewer tiles: every
   tile or every other, so that there are ~2 KP groups): each program takes the maximum key high word of every
   group of BN / R latents of its tile. The last program of a row block to finish (an atomic
   ticket) sorts each row's G = sampled tiles * R group maxima and keeps the K-th largest. Those K maxima are
   K distinct entries of the row, so the row's K-th largest entry is at least as large: every entry of the true
   top K passes `key >= threshold`, provided both launches compute the same tile values, which they do: the
   same tile, loop and operations. MARGIN (the threshold lowered by 2^12 in the key's high word, ~2^-11
   relative) is only a backstop against a last-bit difference. It zeroes the rows' candidate counts.
2. `_filter_kernel`, one program per [BM, BN] tile of the whole x @ W_enc (`_preact_tile`, as launch 1):
   one fp32 compare per entry against the row's threshold value; a survivor (~1% of entries) takes the next
   slot of its row's buffer of CAP int64 keys with its own atomic add and stores its key there (in PTX on
   CUDA, `_append_ptx`: the other entries branch over it). About 1.4 K * STRIDE entries survive per row.
3. the tail, one program per token (`_select_topk_kernel` here, `_select_edit_kernel` in snce_edit.py): the
   top K of the row's survivors (`_merge_row` over `count` keys) or, when the count passed CAP (NaN rows, ties
   of a degenerate SAE), the row's exact top K recomputed from x and W_enc (`_direct_row`), never a
   truncated buffer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._combine import max_combine, sum_combine
from ._registry import on_device_of, register_op
from ._tuning import _device_key, interpreting, next_pow2
from .encode_topk import (_KEY_MIN, _compute_mode, _key_high, _merge_row, _needs_wide, _pack, _preact_tile,
                          _topk_last, _unpack_relu, operand_dtype)

_INT32_MIN = tl.constexpr(-(2**31))
_KEY_NEG_INF = tl.constexpr(-2139095041)  # _key_high(-inf): 0xFF800000 ^ 0x7FFFFFFF
_KEY_POS_INF = tl.constexpr(0x7F800000)  # _key_high(+inf)


@triton.jit
def _threshold_kernel(
    x_ptr, w_ptr, b_ptr, gmax_ptr, thr_ptr, cnt_ptr, ticket_ptr,
    M, N, D, K, NS, step,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_gm,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr,
    RS: tl.constexpr, MARGIN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
    GDC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rows_o = rows.to(tl.int64) if WIDE else rows
    rmask = rows < M
    cols = pid_s * step * BN + tl.arange(0, BN)  # sampled tile pid_s * step
    cmask = cols < N
    pre = _preact_tile(x_ptr, w_ptr, b_ptr, rows_o, rmask, cols, cmask, D, stride_xm, stride_xd, stride_wd,
                       stride_wn, BM, BN, BK, UPCAST, PRECISION, WIDE)
    # high words only: the K-th largest key's high word is the K-th largest high word, and int32 halves the sort
    keys = tl.where(cmask[None, :], _key_high(pre), _INT32_MIN)
    gmax = tl.reduce(tl.reshape(keys, (BM, R, BN // R)), 2, max_combine)  # [BM, R]
    gs = pid_s * R + tl.arange(0, R)
    tl.store(gmax_ptr + rows_o[:, None] * stride_gm + gs[None, :], gmax, mask=rmask[:, None])
    tl.debug_barrier()  # every thread's maxima are written before this program takes its ticket
    if GDC:  # the filter launch may start now (PDL): its matmul overlaps the row blocks' sort below
        tl.extra.cuda.gdc_launch_dependents()
    ticket = tl.atomic_add(ticket_ptr + pid_m, 1, sem="acq_rel")
    if ticket == NS - 1:  # the row block's last program: all of its rows' maxima are in memory
        G = NS * R
        g_cols = tl.arange(0, GP)
        ks = tl.arange(0, KP)
        for r0 in range(0, tl.minimum(BM, M - pid_m * BM), RS):  # this serial sort is the launch's tail: real rows only
            rr = pid_m * BM + r0 + tl.arange(0, RS)
            rr_o = rr.to(tl.int64) if WIDE else rr
            rrm = rr < M
            g = tl.load(gmax_ptr + rr_o[:, None] * stride_gm + g_cols[None, :],
                        mask=rrm[:, None] & (g_cols < G)[None, :], other=_INT32_MIN, cache_modifier=".cg")
            top = _topk_last(g, KP)  # [RS, KP], descending
            hi = tl.reduce(tl.where(ks[None, :] == K - 1, top, 0), 1, sum_combine)
            # INT32_MIN when fewer than K groups hold an entry: every entry passes
            thr = tl.where(hi > _INT32_MIN + MARGIN, hi - MARGIN, _INT32_MIN)
            tl.store(thr_ptr + rr_o, thr, mask=rrm)
            tl.store(cnt_ptr + rr_o, tl.zeros((RS,), tl.int32), mask=rrm)
        tl.atomic_xchg(ticket_ptr + pid_m, 0)  # ready for the next launch


@triton.jit
def _threshold_value(thr):
    """The fp32 value whose key high word is `thr` (the inverse of `_key_high`), with thr clamped to the keys of
    -inf..+inf first so the result is never NaN. For every value v, key(v) >= thr implies `not v < result`
    (NaN included: NaN < anything is false), so the float compare lets through a superset of the key compare."""
    t = tl.minimum(tl.maximum(thr, _KEY_NEG_INF), _KEY_POS_INF)
    return tl.where(t >= 0, t, t ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _append_ptx(pre, thr, cnt_ptrs, row_ok, out_ptrs, cols, N, CAP):
    """The filter's epilogue for one entry, in PTX (CUDA only): an entry not below its row's threshold, in a
    real row and column, takes the next slot of its row (`atom.add` on *cnt_ptrs) and, below CAP, stores its
    `_pack` key there (NaN made canonical, the high word ordered like the value, the column low). Every other
    entry branches over all of it: ~1% of entries pass, so the common path is a compare and a branch.
    (Triton's own per-entry `tl.atomic_add` on a [BM, BN] wgmma tile fails triton 3.9's layout pass, and its
    predicated form costs ~13 issued instructions per entry against ~6 here: docs/kernels.md.) Returns 0."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p;
        .reg .u32 s, h, m;
        .reg .u64 a;
        mov.u32 $0, 0;
        setp.lt.f32 p, $1, $2;
        @p bra SKIP;
        setp.eq.u32 p, $4, 0;
        setp.ge.or.s32 p, $6, $7, p;
        @p bra SKIP;
        atom.global.relaxed.gpu.add.u32 s, [$3], 1;
        setp.ge.u32 p, s, $8;
        @p bra SKIP;
        mov.b32 h, $1;
        testp.notanumber.f32 p, $1;
        @p mov.b32 h, 0x7FC00000;
        shr.s32 m, h, 31;
        and.b32 m, m, 0x7FFFFFFF;
        xor.b32 h, h, m;
        mad.wide.u32 a, s, 8, $5;
        st.global.v2.b32 [a], {$6, h};
        SKIP:
        }""",
        # the pointers as int64: triton 3.6 type-checks pointer operands of an inline asm against the others
        constraints="=r,f,f,l,r,l,r,r,r", args=[pre, thr, cnt_ptrs.to(tl.int64), row_ok, out_ptrs.to(tl.int64), cols, N, CAP],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _filter_tile(
    tile, x_ptr, w_ptr, b_ptr, thr_ptr, cnt_ptr, out_ptr, M, N, D, MB, CAP,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WIDE: tl.constexpr, APPEND_PTX: tl.constexpr, GDC: tl.constexpr,
):
    """The filter on tile number `tile` of x @ W_enc (row blocks fastest)."""
    pid_m = tile % MB  # the row blocks of one latent tile run side by side: its W_enc tile is read once from HBM
    pid_n = tile // MB
    rows = pid_m * BM + tl.arange(0, BM)
    rows_o = rows.to(tl.int64) if WIDE else rows
    rmask = rows < M
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    pre = _preact_tile(x_ptr, w_ptr, b_ptr, rows_o, rmask, cols, cmask, D, stride_xm, stride_xd, stride_wd,
                       stride_wn, BM, BN, BK, UPCAST, PRECISION, WIDE)  # the sampling launch's tile, same values
    if GDC:  # launched early (PDL): the sampling launch's thresholds and zeroed counts are complete past this wait
        tl.extra.cuda.gdc_wait()
    # the row's threshold as an fp32 value: one float compare per entry instead of a key per entry
    thr = _threshold_value(tl.load(thr_ptr + rows_o, mask=rmask, other=0))
    if APPEND_PTX:
        # the asm's operands share the tile's shape (broadcasts, no arithmetic)
        _append_ptx(pre, tl.broadcast_to(thr[:, None], (BM, BN)), tl.broadcast_to(cnt_ptr + rows_o[:, None], (BM, BN)),
                    tl.broadcast_to(rmask.to(tl.int32)[:, None], (BM, BN)),
                    tl.broadcast_to(out_ptr + rows_o[:, None] * stride_om, (BM, BN)),
                    tl.broadcast_to(cols[None, :], (BM, BN)), N, CAP)
    else:  # the interpreter (and ROCm, untested): the same rule with per-entry atomics
        cand = ~(pre < thr[:, None]) & rmask[:, None] & cmask[None, :]
        slot = tl.atomic_add(cnt_ptr + rows_o[:, None] + tl.zeros((BM, BN), tl.int32), 1, mask=cand, sem="relaxed")
        tl.store(out_ptr + rows_o[:, None] * stride_om + slot, _pack(pre, cols[None, :]), mask=cand & (slot < CAP))


@triton.jit
def _filter_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, cnt_ptr, out_ptr,
    M, N, D, MB, CAP, NP,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WIDE: tl.constexpr, APPEND_PTX: tl.constexpr, PERSISTENT: tl.constexpr, GDC: tl.constexpr,
):
    """One program per tile, or (PERSISTENT) NP programs, one per SM, each taking its first tile and then looping
    over every NP-th tile after it in one flattened pipeline: the next tile's loads are issued while this tile's
    epilogue runs. Only the first tile waits for the sampling launch (GDC): the wait inside the loop stops triton
    3.9 from pipelining the loads (no LDGSTS at all), and later tiles start after the first one's wait anyway."""
    _filter_tile(tl.program_id(0), x_ptr, w_ptr, b_ptr, thr_ptr, cnt_ptr, out_ptr, M, N, D, MB, CAP,
                 stride_xm, stride_xd, stride_wd, stride_wn, stride_om, BM, BN, BK, UPCAST, PRECISION, WIDE,
                 APPEND_PTX, GDC)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0) + NP, MB * tl.cdiv(N, BN), NP, flatten=True):
            _filter_tile(tile, x_ptr, w_ptr, b_ptr, thr_ptr, cnt_ptr, out_ptr, M, N, D, MB, CAP,
                         stride_xm, stride_xd, stride_wd, stride_wn, stride_om, BM, BN, BK, UPCAST, PRECISION, WIDE,
                         APPEND_PTX, False)


@triton.jit
def _direct_row(x_ptr, w_ptr, b_ptr, m, N, D, stride_xm, stride_xd, stride_wd, stride_wn,
                KP: tl.constexpr, BNF: tl.constexpr, BKF: tl.constexpr):
    """The exact top KP keys of token m, [1, KP] descending, from x and W_enc directly (fp32 products,
    BNF latents at a time): the tail's path for a row whose survivors overflowed its buffer."""
    offs = tl.arange(0, BNF)
    top = tl.full((1, KP), _KEY_MIN, tl.int64)
    for n0 in range(0, N, BNF):
        cols = n0 + offs
        cmask = cols < N
        acc = tl.zeros((BNF,), tl.float32)
        for k0 in range(0, D, BKF):
            ks = k0 + tl.arange(0, BKF)
            kmask = ks < D
            xk = tl.load(x_ptr + m * stride_xm + ks * stride_xd, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + ks[:, None].to(tl.int64) * stride_wd + cols[None, :].to(tl.int64) * stride_wn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += tl.reduce(xk[:, None] * w, 0, sum_combine)
        pre = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0)
        keys = tl.reshape(tl.where(cmask, _pack(pre, cols), _KEY_MIN), (1, BNF))
        top = _topk_last(tl.reshape(tl.join(top, _topk_last(keys, KP)), (1, 2 * KP)), KP)
    return top


@triton.jit
def _select_row(key_ptr, cnt_ptr, x_ptr, w_ptr, b_ptr, m, CAP, N, D, stride_km, stride_xm, stride_xd, stride_wd,
                stride_wn, KP: tl.constexpr, BS: tl.constexpr, BNF: tl.constexpr, BKF: tl.constexpr):
    """Token m's top KP keys, [KP] descending: from its `count` survivors, or directly when they overflowed."""
    c = tl.load(cnt_ptr + m)
    if c <= CAP:
        top = _merge_row(key_ptr + m * stride_km, c, KP, BS)
    else:
        top = _direct_row(x_ptr, w_ptr, b_ptr, m, N, D, stride_xm, stride_xd, stride_wd, stride_wn, KP, BNF, BKF)
    return tl.reshape(top, (KP,))


@triton.jit
def _select_topk_kernel(
    key_ptr, cnt_ptr, x_ptr, w_ptr, b_ptr, v_ptr, i_ptr,
    CAP, N, D, K,
    stride_km, stride_xm, stride_xd, stride_wd, stride_wn, stride_vm, stride_im,
    KP: tl.constexpr, BS: tl.constexpr, BNF: tl.constexpr, BKF: tl.constexpr,
):
    """One token per program: its top K, ReLU'd values (in v_ptr's dtype) and int32 indices."""
    m = tl.program_id(0).to(tl.int64)
    top = _select_row(key_ptr, cnt_ptr, x_ptr, w_ptr, b_ptr, m, CAP, N, D, stride_km, stride_xm, stride_xd,
                      stride_wd, stride_wn, KP, BS, BNF, BKF)
    v, idx = _unpack_relu(top)
    slots = tl.arange(0, KP)
    tl.store(v_ptr + m * stride_vm + slots, v.to(v_ptr.dtype.element_ty), mask=slots < K)
    tl.store(i_ptr + m * stride_im + slots, idx, mask=slots < K)


@dataclass(frozen=True)
class ThresholdConfig:
    BM: int  # rows per tile
    BN: int  # latents per tile
    BK: int  # reduction block over d
    STRIDE: int  # one latent tile in STRIDE is sampled for the threshold
    num_warps: int
    num_stages: int
    PERSISTENT: bool = False  # the filter on a persistent grid (`_filter_kernel`)


# expected survivors per row ~ 1.4 * k * STRIDE (docs/kernels.md). 4 rather than 8: the sampling launch's matmul
# doubles, the survivors and the tail's selection halve; modelled faster at 1-128 prompts (docs/performance.md)
STRIDE = 4
CAP_FACTOR = 4  # buffer slots per expected survivor; tests shrink it to force the overflow path
MARGIN = 1 << 12  # high-word units, ~2**-11 relative: a backstop only (both launches compute identical tiles)
# the filter's grid: "tiles" (default), one program per tile; "persistent" (opt-in, not yet measured on a GPU), one
# program per SM looping over the tiles (docs/kernels.md). SNCE_FAST_THRESHOLD_GRID picks it per process; tests set GRID
GRIDS = ("tiles", "persistent")
GRID = os.environ.get("SNCE_FAST_THRESHOLD_GRID", "tiles")


# programmatic dependent launch of the filter (sm_90+): on unless SNCE_FAST_THRESHOLD_PDL=0; tests set PDL
PDL = os.environ.get("SNCE_FAST_THRESHOLD_PDL", "1") != "0"


def check_grid() -> str:
    """The filter grid in use (`GRID`), or a ValueError naming the bad value."""
    if GRID not in GRIDS:
        raise ValueError(f"SNCE_FAST_THRESHOLD_GRID={GRID!r}: expected one of {GRIDS}")
    return GRID


def threshold_config(M: int, dtype: torch.dtype, device: torch.device) -> ThresholdConfig:
    """The tile of both matmul launches (they must match: see MARGIN) and the filter's grid (`GRID`):
    `gpu_threshold_config` on a GPU."""
    name, _ = _device_key(device)
    persistent = check_grid() == "persistent"
    if name == "cpu-interpreter":
        return ThresholdConfig(BM=min(64, max(16, next_pow2(M))), BN=64, BK=64, STRIDE=STRIDE, num_warps=1,
                               num_stages=1, PERSISTENT=persistent)
    return gpu_threshold_config(M, dtype.itemsize, persistent)


def gpu_threshold_config(M: int, itemsize: int, persistent: bool = False) -> ThresholdConfig:
    """`threshold_config` on a GPU, for tiles of `itemsize`-byte operands (also for `compile_check`), 3 stages.
    16-bit tiles (wgmma on sm_90): BM 64 x BN 64 at 8 warps for <= 64 tokens; BM 128 x BN 64 at 16 warps for
    <= 128 (one prompt: twice the programs of BN 128 for 132 SMs); BM 256 x BN 128 at 16 warps above, which
    halves the W_enc re-reads from L2 that bound BM 128 (modelled 67 vs 92 us at 16 prompts: docs/performance.md;
    127 registers, no spill). fp32 tiles: BM 128 (64) x BN 64 at 8 (4) warps. `persistent`: the same tiles, but
    above 128 tokens at 8 warps (the flattened loop spills 108 bytes at 16 warps' 128-register cap; 252 registers
    at 8)."""
    if itemsize > 2:
        bm = 64 if M <= 64 else 128
        return ThresholdConfig(BM=bm, BN=64, BK=32, STRIDE=STRIDE, num_warps=8 if bm == 128 else 4, num_stages=3,
                               PERSISTENT=persistent)
    bm, bn = (64, 64) if M <= 64 else (128, 64) if M <= 128 else (256, 128)
    warps = 8 if bm == 64 or (persistent and bm == 256) else 16
    return ThresholdConfig(BM=bm, BN=bn, BK=64, STRIDE=STRIDE, num_warps=warps, num_stages=3, PERSISTENT=persistent)


@dataclass(frozen=True)
class ThresholdPlan:
    cfg: ThresholdConfig
    MB: int  # row blocks
    NT: int  # latent tiles
    NS: int  # sampled tiles
    step: int  # tiles between two sampled ones
    R: int  # groups per sampled tile
    KP: int
    CAP: int  # buffer slots per row
    BS: int  # keys merged at once by the tail

    @property
    def G(self) -> int:
        return self.NS * self.R


def threshold_plan(M: int, n: int, k: int, cfg: ThresholdConfig, interpreter: bool) -> ThresholdPlan:
    """Launch geometry: G ~ 2 KP group maxima per row (the K-th of 2 KP maxima lets ~1.4 K * n / sampled entries
    through; 4 KP would let ~1.15 K through but doubles the row block's serial sort), CAP = CAP_FACTOR x K * n /
    sampled (at most next_pow2(n))."""
    KP = next_pow2(k)
    NT = -(-n // cfg.BN)
    # sample one tile in STRIDE, but enough tiles for ~2 KP groups of at least one latent each (small n: all)
    stride = max(1, min(cfg.STRIDE, NT // -(-2 * KP // cfg.BN)))
    NS = -(-NT // stride)
    R = min(cfg.BN, next_pow2(-(-2 * KP // NS)))
    expect = KP * (-(-NT // NS))
    CAP = max(KP, min(next_pow2(CAP_FACTOR * expect), next_pow2(n)))
    BS = max(KP, min(CAP, next_pow2(2 * expect), 1024 if interpreter else 2048))
    return ThresholdPlan(cfg=cfg, MB=-(-M // cfg.BM), NT=NT, NS=NS, step=stride, R=R, KP=KP, CAP=CAP, BS=BS)


def threshold_meta(plan: ThresholdPlan, x_dtype: torch.dtype, w_dtype: torch.dtype, wide: bool = False,
                   gdc: bool = False) -> dict:
    """Constexprs and launch options of `_threshold_kernel` (shared with `compile_check`); `gdc`: let the filter
    launch start early (programmatic dependent launch, `uses_pdl`)."""
    upcast, precision = _compute_mode(x_dtype, w_dtype)
    c = plan.cfg
    GP = max(next_pow2(plan.G), plan.KP)  # the K-th of fewer than KP maxima: INT32_MIN pads (k near n)
    return dict(BM=c.BM, BN=c.BN, BK=c.BK, R=plan.R, GP=GP, KP=plan.KP, RS=max(1, min(c.BM, 4096 // GP)),
                MARGIN=MARGIN, UPCAST=upcast, PRECISION=precision, WIDE=bool(wide), GDC=bool(gdc),
                num_warps=c.num_warps, num_stages=c.num_stages)


def filter_meta(plan: ThresholdPlan, x_dtype: torch.dtype, w_dtype: torch.dtype, wide: bool = False,
                ptx: bool = False, gdc: bool = False) -> dict:
    """Constexprs and launch options of `_filter_kernel` (the same tile as `threshold_meta`); `ptx`: the epilogue
    in PTX (`_append_ptx`), for a CUDA device (not the interpreter, not ROCm)."""
    upcast, precision = _compute_mode(x_dtype, w_dtype)
    c = plan.cfg
    return dict(BM=c.BM, BN=c.BN, BK=c.BK, UPCAST=upcast, PRECISION=precision, WIDE=bool(wide),
                APPEND_PTX=bool(ptx), PERSISTENT=c.PERSISTENT, GDC=bool(gdc), num_warps=c.num_warps,
                num_stages=c.num_stages)


def filter_programs(plan: ThresholdPlan, sms: int) -> int:
    """`_filter_kernel`'s grid: one program per tile, or on the persistent grid one per SM (fewer if fewer tiles)."""
    tiles = plan.MB * plan.NT
    return min(tiles, sms) if plan.cfg.PERSISTENT else tiles


def uses_ptx(device: torch.device) -> bool:
    """True where `_filter_kernel` runs its PTX epilogue: an NVIDIA GPU, not the interpreter."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting()


def uses_pdl(device: torch.device) -> bool:
    """True where the filter launch is a programmatic dependent launch of the sampling launch: an NVIDIA GPU of
    compute capability 9.0 or newer, unless SNCE_FAST_THRESHOLD_PDL=0 (`PDL`). Its programs start while the
    sampling launch's last programs sort the group maxima, and wait (`gdc_wait`) only before reading thresholds."""
    return PDL and uses_ptx(device) and torch.cuda.get_device_capability(device)[0] >= 9


def select_blocks(plan: ThresholdPlan, interpreter: bool) -> dict:
    """Constexprs and warps of the tail (`_select_topk_kernel`, and the edit's `_select_edit_kernel`)."""
    return dict(KP=plan.KP, BS=plan.BS, BNF=max(plan.KP, 64), BKF=16,
                num_warps=1 if interpreter else (4 if plan.BS <= 1024 else 8))


_TICKETS: dict[Any, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown ticket buffers: a captured CUDA graph may still hold their pointers


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tickets, one per row block. Each launch of `_threshold_kernel` leaves them at zero again, so
    outside CUDA graph capture they are kept per (device, stream) and no launch clears them. While a graph is
    captured (its zero fill runs only at replay), they are made afresh and not kept: the graph then holds its own
    zero fill. (torch.compile never traces this: the launches run inside the opaque `threshold_survivors` op.)"""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    t = _TICKETS.get(key)
    if t is None or t.numel() < n:
        if t is not None:
            _RETIRED.append(t)
        t = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _TICKETS[key] = t
    return t


@dataclass
class Survivors:
    """What the two matmul launches leave for the tail: per-row candidate keys and their counts."""
    keys: torch.Tensor  # [M, CAP] int64, the first min(count, CAP) of each row valid
    counts: torch.Tensor  # [M] int32 (may exceed CAP: the tail then recomputes the row)
    plan: ThresholdPlan


def _plan(x: torch.Tensor, W_enc: torch.Tensor, k: int) -> ThresholdPlan:
    M = x.shape[0]
    return threshold_plan(M, W_enc.shape[1], k, threshold_config(M, operand_dtype(x.dtype, W_enc.dtype), x.device),
                          interpreting())


def _survivors_fake(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan(x, W_enc, k)
    return x.new_empty((x.shape[0], plan.CAP), dtype=torch.int64), x.new_empty((x.shape[0],), dtype=torch.int32)


# opaque to Inductor: the filter's PTX epilogue would make its mutation analysis take x, W_enc and the bias as
# written (tests/fused_kernels/test_compile_check.py), and torch.compile would then copy W_enc on every call
@register_op("snce_fast::threshold_survivors", _survivors_fake, opaque=True)
def _survivors_op(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches 1 and 2 (module docstring) for x [M >= 1, d]: (keys [M, CAP] int64, counts [M] int32)."""
    M = x.shape[0]
    plan = _plan(x, W_enc, k)
    keys = x.new_empty((M, plan.CAP), dtype=torch.int64)
    counts = x.new_empty((M,), dtype=torch.int32)
    launch_survivors(x, W_enc, bias, k, plan, keys, counts)
    return keys, counts


def launch_survivors(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int, plan: ThresholdPlan,
                     keys: torch.Tensor, counts: torch.Tensor) -> None:
    """The two launches into given buffers (keys [M, >= CAP] int64, counts [M] int32; a test passes views of
    guarded, larger buffers)."""
    M, d = x.shape
    n = W_enc.shape[1]
    gmax = x.new_empty((M, plan.G), dtype=torch.int32)
    thr = x.new_empty((M,), dtype=torch.int32)
    wide = _needs_wide(x, W_enc, keys, gmax)
    pdl = uses_pdl(x.device)
    with on_device_of(x):
        wrap_triton(_threshold_kernel)[(plan.MB, plan.NS)](
            x, W_enc, bias, gmax, thr, counts, _tickets(x.device, plan.MB),
            M, n, d, k, plan.NS, plan.step,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), gmax.stride(0),
            **threshold_meta(plan, x.dtype, W_enc.dtype, wide, pdl))
        programs = filter_programs(plan, _device_key(x.device)[1])
        wrap_triton(_filter_kernel)[(programs,)](
            x, W_enc, bias, thr, counts, keys,
            M, n, d, plan.MB, plan.CAP, programs if plan.cfg.PERSISTENT else 0,  # NP: 0 (unused) for one per tile
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), keys.stride(0),
            **filter_meta(plan, x.dtype, W_enc.dtype, wide, uses_ptx(x.device), pdl),
            **({"launch_pdl": True} if pdl else {}))  # a launch option: only where it applies


def survivors(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int) -> Survivors:
    """Launches 1 and 2 (module docstring) for x [M >= 1, d], as one opaque op."""
    keys, counts = torch.ops.snce_fast.threshold_survivors(x, W_enc, bias, k)
    return Survivors(keys, counts, _plan(x, W_enc, k))


def threshold_topk(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int,
                   values_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_topk` by threshold selection: three launches."""
    M = x.shape[0]
    s = survivors(x, W_enc, bias, k)
    values = x.new_empty((M, k), dtype=values_dtype)
    indices = x.new_empty((M, k), dtype=torch.int32)
    with on_device_of(x):
        wrap_triton(_select_topk_kernel)[(M,)](
            s.keys, s.counts, x, W_enc, bias, values, indices,
            s.plan.CAP, W_enc.shape[1], x.shape[1], k,
            s.keys.stride(0), x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), values.stride(0),
            indices.stride(0),
            **select_blocks(s.plan, interpreting()))
    return values, indices

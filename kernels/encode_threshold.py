"""The "threshold" selection of the fused TopK encode (docs/kernels.md, "Threshold selection"): no sorting
inside the matmul, Hopper-sized tiles, three launches.

1. `_threshold_kernel`, on one latent tile in `step` (STRIDE = 8 where there are enough tiles; fewer tiles: every
   tile or every other, so that there are ~2 KP groups): each program takes the maximum key high word of every group of BN / R latents of its tile. The last program of a row block to finish (an atomic
   ticket) sorts each row's G = sampled tiles * R group maxima and keeps the K-th largest. Those K maxima are
   K distinct entries of the row, so the row's K-th largest entry is at least as large: every entry of the true
   top K passes `key >= threshold`, provided both launches compute the same tile values, which they do: the
   same tile, loop and operations. MARGIN (the threshold lowered by 2^12 in the key's high word, ~2^-11
   relative) is only a backstop against a last-bit difference. It zeroes the rows' candidate counts.
2. `_filter_kernel`, one program per [BM, BN] tile of the whole x @ W_enc (`_preact_tile`'s loop, written out):
   one compare per entry; survivors are appended to the row's buffer of CAP int64 keys at slots reserved with
   one atomic add per row and placed by popcount. About 1.4 K * STRIDE entries survive per row.
3. the tail, one program per token (`_select_topk_kernel` here, `_select_edit_kernel` in snce_edit.py): the
   top K of the row's survivors (`_merge_row` over `count` keys) or, when the count passed CAP (NaN rows, ties
   of a degenerate SAE), the row's exact top K recomputed from x and W_enc (`_direct_row`), never a
   truncated buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._combine import max_combine, sum_combine
from ._registry import on_device_of
from ._tuning import _device_key, interpreting, next_pow2
from .encode_topk import (_KEY_MIN, _compute_mode, _key_high, _merge_row, _needs_wide, _pack, _preact_tile,
                          _topk_last, _unpack_relu, operand_dtype)

_INT32_MIN = tl.constexpr(-(2**31))


@triton.jit
def _threshold_kernel(
    x_ptr, w_ptr, b_ptr, gmax_ptr, thr_ptr, cnt_ptr, ticket_ptr,
    M, N, D, K, NS, step,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_gm,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr,
    RS: tl.constexpr, MARGIN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
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
def _popc64(v):
    """Set bits of each int64 (SWAR; ptxas turns it into POPC)."""
    v = v - ((v >> 1) & 0x5555555555555555)
    v = (v & 0x3333333333333333) + ((v >> 2) & 0x3333333333333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((v * 0x0101010101010101) >> 56) & 0xFF


@triton.jit
def _filter_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, cnt_ptr, out_ptr,
    M, N, D, MB, CAP,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid % MB  # the row blocks of one latent tile run side by side: its W_enc tile is read once from HBM
    pid_n = pid // MB
    rows = pid_m * BM + tl.arange(0, BM)
    rows_o = rows.to(tl.int64) if WIDE else rows
    rmask = rows < M
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    # `_preact_tile`'s loop, written out: Inductor's mutation analysis follows a store's address back through
    # the arguments of any jit helper whose result it depends on, so with the helper x, W_enc and the bias
    # looked written (torch.compile would copy them every call); the same ops in the same order as the helper
    cols_o = cols.to(tl.int64) if WIDE else cols
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        ks_o = ks.to(tl.int64) if WIDE else ks
        xt = tl.load(x_ptr + rows_o[:, None] * stride_xm + ks_o[None, :] * stride_xd,
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + ks_o[:, None] * stride_wd + cols_o[None, :] * stride_wn,
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    pre = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    tl.static_assert(BN <= 64, "a row's candidates of one tile are one 64-bit mask")
    hi = _key_high(pre)  # int32: a [BM, BN] tile of int64 keys spilled ~1.1 KB per thread on sm_90
    thr = tl.load(thr_ptr + rows_o, mask=rmask, other=0)
    cand = (hi >= thr[:, None]) & rmask[:, None] & cmask[None, :]
    # slots by popcount of the row's candidate mask below each column: 22% fewer SASS instructions and 44 fewer
    # registers than a cumsum along the row on sm_90 (docs/kernels.md)
    bit = tl.full((1, BN), 1, tl.int64) << tl.arange(0, BN).to(tl.int64)[None, :]
    mask_bits = tl.reduce(tl.where(cand, bit, 0), 1, sum_combine)  # distinct bits: the sum is the OR
    n_row = _popc64(mask_bits).to(tl.int32)
    base = tl.atomic_add(cnt_ptr + rows_o, n_row, mask=rmask & (n_row > 0), sem="relaxed")
    pos = base[:, None] + _popc64(mask_bits[:, None] & (bit - 1)).to(tl.int32)
    tl.store(out_ptr + rows_o[:, None] * stride_om + pos, (hi.to(tl.int64) << 32) | cols[None, :].to(tl.int64),
             mask=cand & (pos < CAP))


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


STRIDE = 8  # expected survivors per row ~ 1.4 * k * STRIDE (docs/kernels.md)
CAP_FACTOR = 4  # buffer slots per expected survivor; tests shrink it to force the overflow path
MARGIN = 1 << 12  # high-word units, ~2**-11 relative: a backstop only (both launches compute identical tiles)


def threshold_config(M: int, dtype: torch.dtype, device: torch.device) -> ThresholdConfig:
    """The tile of both matmul launches (they must match: see MARGIN). GPU: BM 128 (64 for <= 64 tokens) x
    BN 64 (wgmma on sm_90), 3 stages (`gpu_threshold_config`). BN 128 spilled ~1.1 KB per thread in the
    filter's scattered store (a 64-bit address per entry); BN 64 does not (docs/kernels.md)."""
    name, _ = _device_key(device)
    if name == "cpu-interpreter":
        return ThresholdConfig(BM=min(64, max(16, next_pow2(M))), BN=64, BK=64, STRIDE=STRIDE, num_warps=1,
                               num_stages=1)
    return gpu_threshold_config(M, dtype.itemsize)


def gpu_threshold_config(M: int, itemsize: int) -> ThresholdConfig:
    """`threshold_config` on a GPU, for tiles of `itemsize`-byte operands (also for `compile_check`). 16-bit tiles:
    16 warps at BM 128 (8 at BM 64): half the epilogue per warp and 90 registers on sm_90 (8 warps: 138), so
    one program keeps 16 warps resident, for 30% more warp instructions per tile in all (docs/performance.md).
    fp32 tiles: 8 warps (16 spilled 4 bytes in the exact-fp32 sampling kernel)."""
    bm = 64 if M <= 64 else 128
    warps = (16 if bm == 128 else 8) if itemsize <= 2 else (8 if bm == 128 else 4)
    return ThresholdConfig(BM=bm, BN=64, BK=64 if itemsize <= 2 else 32, STRIDE=STRIDE, num_warps=warps,
                           num_stages=3)


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


def threshold_meta(plan: ThresholdPlan, x_dtype: torch.dtype, w_dtype: torch.dtype, wide: bool = False) -> dict:
    """Constexprs and launch options of `_threshold_kernel` (shared with `compile_check`)."""
    upcast, precision = _compute_mode(x_dtype, w_dtype)
    c = plan.cfg
    GP = max(next_pow2(plan.G), plan.KP)  # the K-th of fewer than KP maxima: INT32_MIN pads (k near n)
    return dict(BM=c.BM, BN=c.BN, BK=c.BK, R=plan.R, GP=GP, KP=plan.KP, RS=max(1, min(c.BM, 4096 // GP)),
                MARGIN=MARGIN, UPCAST=upcast, PRECISION=precision, WIDE=bool(wide), num_warps=c.num_warps,
                num_stages=c.num_stages)


def filter_meta(plan: ThresholdPlan, x_dtype: torch.dtype, w_dtype: torch.dtype, wide: bool = False) -> dict:
    """Constexprs and launch options of `_filter_kernel` (the same tile as `threshold_meta`)."""
    upcast, precision = _compute_mode(x_dtype, w_dtype)
    c = plan.cfg
    return dict(BM=c.BM, BN=c.BN, BK=c.BK, UPCAST=upcast, PRECISION=precision, WIDE=bool(wide),
                num_warps=c.num_warps, num_stages=c.num_stages)


def select_blocks(plan: ThresholdPlan, interpreter: bool) -> dict:
    """Constexprs and warps of the tail (`_select_topk_kernel`, and the edit's `_select_edit_kernel`)."""
    return dict(KP=plan.KP, BS=plan.BS, BNF=max(plan.KP, 64), BKF=16,
                num_warps=1 if interpreter else (4 if plan.BS <= 1024 else 8))


_TICKETS: dict[Any, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown ticket buffers: a captured CUDA graph may still hold their pointers


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tickets, one per row block. Each launch of `_threshold_kernel` leaves them at zero again, so
    outside CUDA graph capture and torch.compile they are kept per (device, stream) and no launch clears them.
    While a graph is captured (its zero fill runs only at replay) or compiled, they are made afresh and not kept:
    the graph or the compiled code then holds its own zero fill."""
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
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


def survivors(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int) -> Survivors:
    """Launches 1 and 2 (module docstring) for x [M >= 1, d]."""
    M, d = x.shape
    n = W_enc.shape[1]
    cfg = threshold_config(M, operand_dtype(x.dtype, W_enc.dtype), x.device)
    plan = threshold_plan(M, n, k, cfg, interpreting())
    gmax = x.new_empty((M, plan.G), dtype=torch.int32)
    thr = x.new_empty((M,), dtype=torch.int32)
    counts = x.new_empty((M,), dtype=torch.int32)
    keys = x.new_empty((M, plan.CAP), dtype=torch.int64)
    wide = _needs_wide(x, W_enc, keys, gmax)
    with on_device_of(x):
        wrap_triton(_threshold_kernel)[(plan.MB, plan.NS)](
            x, W_enc, bias, gmax, thr, counts, _tickets(x.device, plan.MB),
            M, n, d, k, plan.NS, plan.step,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), gmax.stride(0),
            **threshold_meta(plan, x.dtype, W_enc.dtype, wide))
        wrap_triton(_filter_kernel)[(plan.MB * plan.NT,)](
            x, W_enc, bias, thr, counts, keys,
            M, n, d, plan.MB, plan.CAP,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), keys.stride(0),
            **filter_meta(plan, x.dtype, W_enc.dtype, wide))
    return Survivors(keys, counts, plan)


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

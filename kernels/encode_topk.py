"""Fused TopK encode: x [M, d] -> (values [M, k], indices [M, k] int32), never writing M x n.

Grid (row blocks, latent splits). Each program computes `pre = x @ W_enc + bias` one
[BM, BN] tile at a time (fp32 accumulate; `bias = b_enc - b_dec @ W_enc` is folded once
in fp32) and keeps a running top-KP (KP = next power of two >= k) per row as int64
keys `(order-preserving fp32 bits << 32) | latent index`: one max/topk over keys gives
value and index together, and keys are unique. Per tile only entries above the row's
current threshold (the KP-th best so far) are candidates; when few are, they are
inserted one at a time (replace the minimum), otherwise the tile is merged with a
bitonic `tl.topk`. The opt-in "compact" path (`_encode_compact_kernel`) instead compacts
candidates into a per-(row, split) buffer and sorts only when it fills. The [M, splits * KP]
keys are merged, unpacked and ReLU'd in one more launch (`_merge_topk_kernel`), or inside
the fused edit kernel (kernels/snce_edit.py).
See docs/kernels.md.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.jit import constexpr_function

from snce_fast.ops.reference import folded_encoder_bias

from . import _cache
from ._combine import max_combine, min_combine, sum_combine
from ._registry import on_device_of, register_op
from ._tuning import EncodeConfig, encode_config, encode_splits, interpreting, next_pow2, tune_encode

_KEY_MIN = tl.constexpr(-(2**63))
_SENTINEL_END = tl.constexpr(-(2**63) + 2**32)  # keys below this are initial sentinels (high word INT32_MIN)


@triton.jit
def _key_high(v):
    """int32 ordering like the fp32 value v (the high word of `_pack`'s key). Every NaN becomes the positive quiet
    NaN 0x7FC00000, whose key is above +inf's: NaN ranks first, as in torch.topk (the reference), and no real key
    reaches INT32_MIN, the sentinels' high word (only the NaN 0xFFFFFFFF did)."""
    b = v.to(tl.int32, bitcast=True)
    b = tl.where(v != v, 0x7FC00000, b)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _pack(v, cols):
    """int64 key ordering like the fp32 value v, ties broken by the column index (`_key_high` above it)."""
    return (_key_high(v).to(tl.int64) << 32) | cols.to(tl.int64)


@triton.jit
def _is_sentinel(key):
    """True for the initial sentinel keys (`_KEY_MIN + slot`) only. (It was `key < -(2**62)`, which is also
    true for every real value <= -2.0: such a row's threshold read as -inf and every later tile of it was
    all candidates, the slow path; tests/fused_kernels/test_kernel_encode_topk.py::test_key_round_trip.)"""
    return key < _SENTINEL_END


@triton.jit
def _key_value(key):
    """fp32 value of a key; -inf for the initial sentinels."""
    b = (key >> 32).to(tl.int32)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    v = b.to(tl.float32, bitcast=True)
    return tl.where(_is_sentinel(key), float("-inf"), v)


# Shape/axis arithmetic of the hypercube, as constexpr functions of the cube's numel: the
# compiler turns a plain `name = <int>` inside a jit function into a tensor, so none of
# these values is ever assigned to a variable there.
@constexpr_function
def _rank(numel):
    return int(numel).bit_length() - 1


@constexpr_function
def _cube(numel):
    """[2, 2, ..., 2]: the hypercube shape of a power-of-two numel."""
    return [2] * _rank(numel)


@constexpr_function
def _width(stage, log_k):
    """Compare-and-swap passes in a bitonic stage (stages past log_k merge K-runs only)."""
    return min(int(stage), int(log_k))


@constexpr_function
def _inner(stage, log_k, r):
    """Innermost-axis number swapped by pass r of a stage."""
    return _width(stage, log_k) - 1 - int(r)


@constexpr_function
def _axis(numel, j):
    """The j-th innermost axis of the cube, counted from the outside."""
    return _rank(numel) - 1 - int(j)


@constexpr_function
def _axis_shape(numel, j):
    """[1, .., 2, .., 1] of the cube's rank with the 2 on the j-th innermost axis."""
    nd, j = _rank(numel), int(j)
    return [1] * (nd - j - 1) + [2] + [1] * j


@constexpr_function
def _ones(numel):
    return [1] * _rank(numel)


@triton.jit
def _topk_last(x, K: tl.constexpr):
    """The K (power of two) largest entries of each row of 2-D x, sorted descending.

    Bitonic top-k on the [2] * log2(numel) hypercube (the scheme of triton's
    `tl.topk`), with each compare-and-swap done as min/max over a size-2 axis rather
    than an xor_sum partner exchange: the same size-2 reduce on the GPU, but vectorised
    in the interpreter. Everything is inlined (static loops, `tl.reduce` with the
    combine functions of `_combine`, which are triton's own under the interpreter)
    because each nested jit call re-patches the language in the interpreter.
    """
    log_n: tl.constexpr = _rank(x.shape[1])
    log_k: tl.constexpr = _rank(K)
    if log_k == 0:
        out = tl.reduce(x, 1, max_combine, keep_dims=True)
    else:
        h = tl.reshape(x, _cube(x.numel))
        for stage in tl.static_range(1, log_n + 1):
            if stage > log_k:  # halve: keep the larger of each pair of sorted K-runs
                h = tl.reduce(h, _axis(h.numel, log_k), max_combine)
            if stage < log_n:  # alternate directions so that pairs of runs form bitonic sequences
                flip = tl.reshape(tl.arange(0, 2), _axis_shape(h.numel, _width(stage, log_k)))
            else:  # last stage: descending everywhere
                flip = tl.full(_ones(h.numel), 1, tl.int32)
            for r in tl.static_range(_width(stage, log_k)):
                lo = tl.reduce(h, _axis(h.numel, _inner(stage, log_k, r)), min_combine, keep_dims=True)
                hi = tl.reduce(h, _axis(h.numel, _inner(stage, log_k, r)), max_combine, keep_dims=True)
                right = tl.reshape(tl.arange(0, 2), _axis_shape(h.numel, _inner(stage, log_k, r)))
                h = tl.where((flip ^ right).to(tl.int1), hi, lo)
        out = tl.reshape(h, (x.shape[0], K))
    return out


@triton.jit
def _preact_tile(x_ptr, w_ptr, b_ptr, rows_o, rmask, cols, cmask, D, stride_xm, stride_xd, stride_wd, stride_wn,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, WIDE: tl.constexpr):
    """[BM, BN] fp32 pre-activations x[rows] @ W_enc[:, cols] + bias[cols] of one tile (masked rows and columns
    read 0), accumulated over BK-wide blocks of d."""
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
        if UPCAST:  # mixed or fp32 inputs: fp32 tiles, tf32 (16-bit x) or exact ieee (fp32 x) products
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    bias = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    return acc + bias[None, :]


@triton.jit
def _encode_topk_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, D, CHUNK,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, FEW: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rows_o = rows.to(tl.int64) if WIDE else rows  # element offsets past 2**31 need int64
    rmask = rows < M
    slots = tl.arange(0, KP)
    # unique sentinels below every real key (the smallest, -inf's, is ~ -2**63 + 2**55) and above _KEY_MIN,
    # the fill of non-candidates, so a merge never keeps a fill next to a sentinel
    top = tl.zeros((BM, KP), dtype=tl.int64) + (slots.to(tl.int64)[None, :] + (_KEY_MIN + 1))
    thr_key = tl.reduce(top, 1, min_combine)
    thr_v = tl.full((BM,), float("-inf"), tl.float32)
    # rows still holding sentinels, carried beside thr_key rather than recomputed from it in the tile loop: the
    # recomputation (with the insertion loop below) crashes triton 3.6's RemoveLayoutConversions pass
    filling = tl.full((BM,), 1, tl.int32)
    n_start = pid_s * CHUNK
    n_end = tl.minimum(n_start + CHUNK, N)
    for n0 in range(n_start, n_end, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < n_end
        pre = _preact_tile(x_ptr, w_ptr, b_ptr, rows_o, rmask, cols, cmask, D, stride_xm, stride_xd, stride_wd,
                           stride_wn, BM, BN, BK, UPCAST, PRECISION, WIDE)
        # NaN ranks first (as torch.topk): always a candidate; while a row still holds sentinels every entry is
        # one (-inf included), so a row with fewer than KP values above -inf never keeps a sentinel
        cand = (pre > thr_v[:, None]) | (pre != pre) | (filling != 0)[:, None]
        cand = cand & cmask[None, :] & rmask[:, None]
        n_cand = tl.reduce(tl.reduce(cand.to(tl.int32), 1, sum_combine), 0, max_combine)
        if n_cand > 0:
            keys = tl.where(cand, _pack(pre, cols), _KEY_MIN)
            if n_cand > FEW:
                tile_top = _topk_last(keys, KP)
                both = tl.reshape(tl.join(top, tile_top), (BM, 2 * KP))
                top = _topk_last(both, KP)
            else:
                best = tl.reduce(keys, 1, max_combine)
                while tl.reduce((best > thr_key).to(tl.int32), 0, max_combine) > 0:
                    upd = best > thr_key
                    top = tl.where((top == thr_key[:, None]) & upd[:, None], best[:, None], top)
                    keys = tl.where(keys == best[:, None], _KEY_MIN, keys)
                    thr_key = tl.reduce(top, 1, min_combine)
                    best = tl.reduce(keys, 1, max_combine)
            thr_key = tl.reduce(top, 1, min_combine)
            thr_v = _key_value(thr_key)
            filling = _is_sentinel(thr_key).to(tl.int32)
    out_cols = pid_s * KP + slots
    tl.store(out_ptr + rows_o[:, None] * stride_om + out_cols[None, :], top, mask=rmask[:, None])


@triton.jit
def _select_buffer(bv_ptr, bi_ptr, out_ptr, boff, ooff, cnt, thr, BM: tl.constexpr, KP: tl.constexpr,
                   CAP: tl.constexpr, RS: tl.constexpr, FINAL: tl.constexpr):
    """Reduce each row's candidate buffer (fp32 values, int32 indices; `cnt` valid entries, at row offsets
    `boff`) to its top KP, RS rows at a time (so only [RS, CAP] keys are live: one bitonic top-KP each).
    FINAL: store the top-KP keys at `ooff` (sentinel-padded), as `_encode_topk_kernel` does; else write them
    back, sorted, to the buffer's first KP slots and return (new counts, new thresholds)."""
    slots = tl.arange(0, CAP)
    ks = tl.arange(0, KP)
    for r0 in range(0, BM, RS):  # a loop, not unrolled: groups must not be loaded (and live) at once
        sel = (tl.arange(0, RS)[:, None] + r0) == tl.arange(0, BM)[None, :]  # [RS, BM]: this group's rows
        cnt_g = tl.reduce(tl.where(sel, cnt[None, :], 0), 1, sum_combine)
        boff_g = tl.reduce(tl.where(sel, boff[None, :], 0), 1, sum_combine)
        valid = slots[None, :] < cnt_g[:, None]
        v = tl.load(bv_ptr + boff_g[:, None] + slots[None, :], mask=valid, other=0.0)
        i = tl.load(bi_ptr + boff_g[:, None] + slots[None, :], mask=valid, other=0)
        top = _topk_last(tl.where(valid, _pack(v, i), _KEY_MIN), KP)
        keep = ks[None, :] < cnt_g[:, None]
        if FINAL:  # a row with fewer than KP entries in its chunk pads with unique sentinels
            ooff_g = tl.reduce(tl.where(sel, ooff[None, :], 0), 1, sum_combine)
            top = tl.where(keep, top, ks.to(tl.int64)[None, :] + (_KEY_MIN + 1))
            tl.store(out_ptr + ooff_g[:, None] + ks[None, :], top, mask=(ooff_g >= 0)[:, None])
        else:
            tl.debug_barrier()  # the group's buffer is read before any thread overwrites it
            tv, ti = _unpack_key(top)
            tl.store(bv_ptr + boff_g[:, None] + ks[None, :], tv, mask=keep)
            tl.store(bi_ptr + boff_g[:, None] + ks[None, :], ti, mask=keep)
    new_cnt = tl.minimum(cnt, KP)
    if not FINAL:
        tl.debug_barrier()
        # the KP-th value of a full row is the last of its sorted top KP, now in slot KP - 1
        thr = tl.load(bv_ptr + boff + KP - 1, mask=new_cnt >= KP, other=float("-inf"))
    return new_cnt, thr


@triton.jit
def _unpack_key(key):
    b = (key >> 32).to(tl.int32)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True), (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _encode_compact_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, bv_ptr, bi_ptr,
    M, N, D, CHUNK,
    stride_xm, stride_xd, stride_wd, stride_wn, stride_om, stride_bm,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr, RS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr,
):
    """The "compact" selection (docs/kernels.md): no sorting per tile. Entries above the row's running
    threshold (or NaN, or any while the row holds fewer than KP) are compacted with a cumsum into a per-(row,
    split) buffer of CAP >= KP + BN (value, index) slots in global scratch; only when a whole tile might not
    fit some row's buffer is it reduced to its top KP (bitonic top-KP, RS rows at a time, `_select_buffer`),
    before the tile, which also raises the threshold; once more at the end, writing the program's top-KP keys as `_encode_topk_kernel` does."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rows_o = rows.to(tl.int64) if WIDE else rows
    rmask = rows < M
    boff = rows_o * stride_bm + pid_s * CAP
    ooff = tl.where(rmask, rows_o * stride_om + pid_s * KP, -1)  # -1: no output row
    cnt = tl.zeros((BM,), dtype=tl.int32)
    thr = tl.full((BM,), float("-inf"), tl.float32)
    n_start = pid_s * CHUNK
    n_end = tl.minimum(n_start + CHUNK, N)
    for n0 in range(n_start, n_end, BN):
        # a whole tile might not fit some row's buffer: select first, before the tile is live (selecting with
        # the tile's values live spilled 250-400 bytes on sm_90)
        if tl.reduce(cnt, 0, max_combine) > CAP - BN:
            cnt, thr = _select_buffer(bv_ptr, bi_ptr, out_ptr, boff, ooff, cnt, thr, BM, KP, CAP, RS, False)
        cols = n0 + tl.arange(0, BN)
        cmask = cols < n_end
        # `_preact_tile`'s loop, written out (the same ops): Inductor's mutation analysis follows a store's address
        # back through the arguments of any jit helper whose result it depends on, so through the helper x,
        # W_enc and the bias looked written (torch.compile would copy them every call)
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
        live = cmask[None, :] & rmask[:, None]
        cand = ((pre > thr[:, None]) | (pre != pre) | (cnt < KP)[:, None]) & live
        n_row = tl.reduce(cand.to(tl.int32), 1, sum_combine)
        pos = cnt[:, None] + tl.cumsum(cand.to(tl.int32), 1) - 1
        ok = cand & (pos < CAP)
        tl.store(bv_ptr + boff[:, None] + pos, pre, mask=ok)
        tl.store(bi_ptr + boff[:, None] + pos, cols[None, :] + tl.zeros((BM, BN), tl.int32), mask=ok)
        cnt = cnt + n_row
        tl.debug_barrier()  # the buffer writes are visible to every thread of the program before a select
    _select_buffer(bv_ptr, bi_ptr, out_ptr, boff, ooff, cnt, thr, BM, KP, CAP, RS, True)


@triton.jit
def _merge_row(key_ptr, S, KP: tl.constexpr, BS: tl.constexpr):
    """The top KP of the S keys at key_ptr (one token's per-split candidates), sorted descending, [1, KP]:
    BS keys at a time, each block's top KP merged into the running top KP (BS >= KP, powers of two)."""
    offs = tl.arange(0, BS)
    top = _topk_last(tl.reshape(tl.load(key_ptr + offs, mask=offs < S, other=_KEY_MIN), (1, BS)), KP)
    for s0 in range(BS, S, BS):
        blk = tl.load(key_ptr + s0 + offs, mask=s0 + offs < S, other=_KEY_MIN)
        blk_top = _topk_last(tl.reshape(blk, (1, BS)), KP)
        top = _topk_last(tl.reshape(tl.join(top, blk_top), (1, 2 * KP)), KP)
    return top


@triton.jit
def _unpack_relu(key):
    """keys -> (ReLU'd fp32 values, int32 latent indices); NaN stays NaN (as torch.relu), -0.0 and below -> 0."""
    v, idx = _unpack_key(key)
    return tl.where((v > 0.0) | (v != v), v, 0.0), idx


@triton.jit
def _merge_topk_kernel(
    key_ptr, v_ptr, i_ptr,
    S, K,
    stride_km, stride_vm, stride_im,
    KP: tl.constexpr, BS: tl.constexpr,
):
    """One token per program: merge its S = splits * KP candidate keys to the top K, sorted descending,
    and write ReLU'd values (in v_ptr's dtype) and int32 indices: the whole tail of `encode_topk` in one launch."""
    m = tl.program_id(0).to(tl.int64)
    v, idx = _unpack_relu(tl.reshape(_merge_row(key_ptr + m * stride_km, S, KP, BS), (KP,)))
    slots = tl.arange(0, KP)
    tl.store(v_ptr + m * stride_vm + slots, v.to(v_ptr.dtype.element_ty), mask=slots < K)
    tl.store(i_ptr + m * stride_im + slots, idx, mask=slots < K)


def merge_blocks(S: int, KP: int, interpreter: bool) -> dict:
    """Constexprs and warps of one `_merge_topk_kernel` launch for S keys per row (shared with `compile_check`
    and the fused edit): the whole row in one block up to 2048 keys (1024 in the interpreter)."""
    BS = max(KP, min(next_pow2(S), 1024 if interpreter else 2048))
    return dict(KP=KP, BS=BS, num_warps=1 if interpreter else (4 if BS <= 1024 else 8))


_HALF = (torch.float16, torch.bfloat16)


def operand_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The dtype the tiles are held in: the shared 16-bit dtype, else fp32 (the config table and the tuning
    cache are keyed by it: fp16 activations with an fp32 SAE hold fp32 tiles, and spill, like fp32)."""
    return x_dtype if _compute_mode(x_dtype, w_dtype)[0] is False else torch.float32


def _compute_mode(x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast to fp32, dot precision) of one launch (docs/kernels.md, "Operand dtypes"):
    * x and W_enc share a 16-bit dtype: tensor cores on the inputs;
    * 16-bit x with an fp32 or other 16-bit W_enc (the usual patch: fp16 pipeline, fp32 SAE): both upcast to
      fp32 and multiplied as tf32 on tensor cores. Every fp16/bf16 value is exact in tf32 (8-bit exponent,
      10-bit mantissa), so only an fp32 W_enc is rounded, to the 10-bit mantissa x already has (relative error
      <= 2**-10, the size of x's own fp16 rounding); it was exact fp32 (ieee) without tensor cores before;
    * fp32 x: exact fp32 (ieee), matching the fp32 reference.
    A bool rather than a tl.dtype constexpr: Inductor writes constexpr values into its generated launcher by repr."""
    if x_dtype == w_dtype and x_dtype in _HALF:
        return False, "tf32"
    if x_dtype in _HALF and w_dtype in (*_HALF, torch.float32):
        return True, "tf32"
    return True, "ieee"


def kernel_meta(cfg: EncodeConfig, KP: int, x_dtype: torch.dtype, w_dtype: torch.dtype, wide: bool = False) -> dict:
    """Constexpr arguments and launch options of one launch (shared with `compile_check`);
    `wide`: some element offset reaches 2**31, so offsets are computed in int64."""
    upcast, precision = _compute_mode(x_dtype, w_dtype)
    return dict(BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, KP=KP, FEW=cfg.FEW, UPCAST=upcast, PRECISION=precision,
                WIDE=bool(wide), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_FORCE_WIDE = False  # tests: take the int64-offset path on small shapes


def _needs_wide(*tensors: torch.Tensor) -> bool:
    """True when an element offset of some 2-D tensor (with its strides) can pass int32."""
    def extent(t: torch.Tensor) -> int:
        return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    return _FORCE_WIDE or any(extent(t) >= 2**31 - 1 for t in tensors)


def _launch(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor,
            cfg: EncodeConfig, KP: int, splits: int, chunk: int) -> None:
    M, d = x.shape
    n = W_enc.shape[1]
    with on_device_of(x):
        wrap_triton(_encode_topk_kernel)[(triton.cdiv(M, cfg.BM), splits)](
            x, W_enc, bias, keys,
            M, n, d, chunk,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), keys.stride(0),
            **kernel_meta(cfg, KP, x.dtype, W_enc.dtype, _needs_wide(x, W_enc, keys)),
        )


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (fp32 values, int32 indices) (eager; the kernels decode in `_unpack_relu`)."""
    b = (keys >> 32).to(torch.int32)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return b.view(torch.float32), (keys & 0xFFFFFFFF).to(torch.int32)


SELECT_PATHS = ("sort", "compact", "threshold")
# "sort" (default): `_encode_topk_kernel`; "compact": `_encode_compact_kernel` (no per-tile sorting);
# "threshold": kernels/encode_threshold.py (sampled threshold, filter, per-token tail). The last two are not yet
# measured on a GPU, so not the default. SNCE_FAST_ENCODE_SELECT picks it per process; tests set `SELECT`.
SELECT = os.environ.get("SNCE_FAST_ENCODE_SELECT", "sort")


def compact_meta(cfg: EncodeConfig, KP: int, x_dtype: torch.dtype, w_dtype: torch.dtype, wide: bool = False) -> dict:
    """Constexprs and launch options of one `_encode_compact_kernel` launch (for `compile_check`): the sort
    path's tile (BN, BK, warps; BM at most 32) with CAP = next_pow2(KP + BN) buffer slots per (row, split), selected one
    row at a time (RS 1) and at most 2 pipeline stages: the choices without spills on sm_90 (docs/kernels.md)."""
    meta = kernel_meta(cfg, KP, x_dtype, w_dtype, wide)
    meta.pop("FEW")
    return dict(meta, BM=min(cfg.BM, 32), CAP=next_pow2(KP + cfg.BN), RS=1, num_stages=min(cfg.num_stages, 2))


def _launch_compact(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor,
                    cfg: EncodeConfig, KP: int, splits: int, chunk: int) -> None:
    M, d = x.shape
    n = W_enc.shape[1]
    CAP = next_pow2(KP + cfg.BN)
    bv = x.new_empty((M, splits * CAP), dtype=torch.float32)  # scratch: per-(row, split) candidate buffers
    bi = x.new_empty((M, splits * CAP), dtype=torch.int32)
    meta = compact_meta(cfg, KP, x.dtype, W_enc.dtype, _needs_wide(x, W_enc, keys, bv))
    with on_device_of(x):
        wrap_triton(_encode_compact_kernel)[(triton.cdiv(M, meta["BM"]), splits)](
            x, W_enc, bias, keys, bv, bi,
            M, n, d, chunk,
            x.stride(0), x.stride(1), W_enc.stride(0), W_enc.stride(1), keys.stride(0), bv.stride(0),
            **meta,
        )


def check_select() -> str:
    """The selection path in use (`SELECT`), or a ValueError naming the bad value."""
    if SELECT not in SELECT_PATHS:
        raise ValueError(f"SNCE_FAST_ENCODE_SELECT={SELECT!r}: expected one of {SELECT_PATHS}")
    return SELECT


def candidate_keys(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """Launch the encode kernel of the `SELECT` path: [M, splits * KP] int64 candidate keys (each program's top
    KP; unordered for "sort", sorted for "compact")."""
    M, d = x.shape
    n = W_enc.shape[1]
    KP = next_pow2(k)
    cfg = encode_config(M, n, d, KP, operand_dtype(x.dtype, W_enc.dtype), x.device)
    splits, chunk = encode_splits(M, n, KP, cfg, x.device)
    keys = x.new_empty((M, splits * KP), dtype=torch.int64)
    (_launch_compact if check_select() == "compact" else _launch)(x, W_enc, bias, keys, cfg, KP, splits, chunk)
    return keys


def merge_keys(keys: torch.Tensor, k: int,
               values_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, S] candidate keys -> (ReLU'd values [M, k] in values_dtype, sorted descending; int32 indices [M, k]),
    one launch (`_merge_topk_kernel`)."""
    M, S = keys.shape
    values = keys.new_empty((M, k), dtype=values_dtype)
    indices = keys.new_empty((M, k), dtype=torch.int32)
    if M:
        with on_device_of(keys):
            wrap_triton(_merge_topk_kernel)[(M,)](
                keys, values, indices, S, k, keys.stride(0), values.stride(0), indices.stride(0),
                **merge_blocks(S, next_pow2(k), interpreting()))
    return values, indices


def _encode_topk_fake(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int,
                      values_in_x_dtype: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    M = x.shape[0]
    vdt = x.dtype if values_in_x_dtype else torch.float32
    return x.new_empty((M, k), dtype=vdt), x.new_empty((M, k), dtype=torch.int32)


@register_op("snce_fast::encode_topk", _encode_topk_fake)
def encode_topk(x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int,
                values_in_x_dtype: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, d], W_enc [d, n], folded fp32 bias [n] -> (ReLU'd top-k values [M, k] sorted descending, fp32 or
    in x's dtype with `values_in_x_dtype`; indices int32 [M, k]). Two launches: the encode kernel and the
    merge (`_merge_topk_kernel`), which also sorts (one-at-a-time insertions leave a program's keys unordered)."""
    vdt = x.dtype if values_in_x_dtype else torch.float32
    if x.shape[0] == 0:
        return x.new_empty((0, k), dtype=vdt), x.new_empty((0, k), dtype=torch.int32)
    if check_select() == "threshold":
        from .encode_threshold import threshold_topk
        return threshold_topk(x, W_enc, bias, k, vdt)
    return merge_keys(candidate_keys(x, W_enc, bias, k), k, vdt)


def folded_bias(sae: Any) -> torch.Tensor:
    """`b_enc - b_dec @ W_enc` in fp32, made once per weight tensors and in-place version (see
    `_cache.derived`). After writes through `.data`, call `snce_fast.kernels.clear_bias_cache()`.
    While torch.compile traces, a holder's precomputed `b_enc_folded` (a patch's, made at patch time)
    is used rather than folding again on every call, which would read W_enc a second time."""
    W, b_enc, b_dec = sae.W_enc, sae.b_enc, sae.b_dec
    if torch.compiler.is_compiling():
        pre = getattr(sae, "b_enc_folded", None)
        return pre.float() if isinstance(pre, torch.Tensor) else folded_encoder_bias(W, b_enc, b_dec)
    return _cache.derived((W, b_enc, b_dec), "folded_bias", lambda: folded_encoder_bias(W, b_enc, b_dec))


def clear_bias_cache() -> None:
    """Forget every cached weight-derived tensor (needed only after writing weights through `.data`)."""
    _cache.clear()


def tune(x: torch.Tensor, sae: Any, force: bool = False) -> None:
    """Time the candidate configs for x's shape on this GPU and cache the fastest by device name
    (a shape bucket tuned before on a GPU of that name is kept unless `force`)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M, d = x2.shape
    n, KP = sae.W_enc.shape[1], next_pow2(sae.k)
    bias = folded_bias(sae)

    def run(cfg: EncodeConfig) -> None:
        splits, chunk = encode_splits(M, n, KP, cfg, x2.device)
        keys = x2.new_empty((M, splits * KP), dtype=torch.int64)
        _launch(x2, sae.W_enc, bias, keys, cfg, KP, splits, chunk)

    tune_encode(run, M, n, d, KP, operand_dtype(x2.dtype, sae.W_enc.dtype), x2.device, force=force)

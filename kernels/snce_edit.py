"""Fused SNCE edit (docs/method.md): encode + TopK (the `encode_topk` kernel), then one
per-token kernel that finds the target latents among the token's k active ones,
applies the scale/clamp rule and writes

    x' = x + sum_{j in T} (z'_j - z_j) W_dec[j]   where a target fires and the token is allowed,
    x' = x (the loaded bits, stored back unchanged) everywhere else.

Two kernels share the per-token body (`_edit_row`): `_edit_residual_kernel` reads a token's
(values, indices) (`snce_fast::triton_edit_residual`, used with the gate), and
`_edit_keys_kernel` reads the encode kernel's per-split candidate keys and merges them itself
(`snce_fast::triton_edit_residual_keys`): a residual edit without the gate is then two launches,
encode + edit (docs/kernels.md, "Launches per call"). The reconstruct mode and the gate are
assembled in `snce_fast.kernels.edit` from these ops plus small torch ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._combine import max_combine, sum_combine
from .encode_threshold import Survivors, _select_row, select_blocks
from .encode_topk import _merge_row, _unpack_relu, merge_blocks
from ._registry import on_device_of, register_op
from ._tuning import interpreting, next_pow2


@triton.jit
def _edit_row(x_ptr, o_ptr, m, idx, v, t_ptr, wt_ptr, a_ptr, T, D, stride_xm, stride_om, a_rows, stride_a0, stride_a1,
              scale, clamp, USE_CLAMP: tl.constexpr, HAS_ALLOWED: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Token m with its top-k (idx [BK] int32, -1 in unused slots; v [BK] fp32): the residual edit of one row."""
    ts = tl.arange(0, BT)
    tmask = ts < T
    tg = tl.load(t_ptr + ts, mask=tmask, other=-2)
    hit = idx[:, None] == tg[None, :]  # [BK, BT]
    z = tl.reduce(tl.where(hit, v[:, None], 0.0), 0, sum_combine)  # z_j per target (0 if not active)
    if USE_CLAMP:
        z_new = tl.minimum(z, clamp)
    else:
        z_new = z * scale
    coef = tl.where(tmask & (z > 0.0), z_new - z, 0.0)  # only targets that fire move (docs/method.md)
    fires = tl.reduce(((z > 0.0) & tmask).to(tl.int32), 0, max_combine)
    if HAS_ALLOWED:  # allowed[m // a_rows, m % a_rows] of a 2-D (possibly expanded, stride 0) bool/int8 mask
        fires = fires * tl.load(a_ptr + (m // a_rows) * stride_a0 + (m % a_rows) * stride_a1).to(tl.int32)
    fires = fires > 0
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D
        xv = tl.load(x_ptr + m * stride_xm + cols, mask=cmask, other=0.0)
        w = tl.load(wt_ptr + ts[:, None] * D + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        delta = tl.reduce(coef[:, None] * w, 0, sum_combine)
        edited = (xv.to(tl.float32) + delta).to(xv.dtype)
        tl.store(o_ptr + m * stride_om + cols, tl.where(fires, edited, xv), mask=cmask)


@triton.jit
def _edit_residual_kernel(
    x_ptr, v_ptr, i_ptr, t_ptr, wt_ptr, a_ptr, o_ptr,
    K, T, D,
    stride_xm, stride_vm, stride_im, stride_om,
    scale, clamp,
    USE_CLAMP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BK)
    kmask = ks < K
    idx = tl.load(i_ptr + m * stride_im + ks, mask=kmask, other=-1)
    v = tl.load(v_ptr + m * stride_vm + ks, mask=kmask, other=0.0).to(tl.float32)
    _edit_row(x_ptr, o_ptr, m, idx, v, t_ptr, wt_ptr, a_ptr, T, D, stride_xm, stride_om, 1, 1, 0,
              scale, clamp, USE_CLAMP, True, BT, BD)


@triton.jit
def _edit_keys_kernel(
    x_ptr, key_ptr, t_ptr, wt_ptr, a_ptr, o_ptr,
    S, K, T, D,
    stride_xm, stride_km, stride_om, a_rows, stride_a0, stride_a1,
    scale, clamp,
    USE_CLAMP: tl.constexpr, HAS_ALLOWED: tl.constexpr, KP: tl.constexpr, BS: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr,
):
    """The encode tail fused into the edit: merge token m's S candidate keys to its top K (as
    `_merge_topk_kernel`), then `_edit_row`."""
    m = tl.program_id(0).to(tl.int64)
    v, idx = _unpack_relu(tl.reshape(_merge_row(key_ptr + m * stride_km, S, KP, BS), (KP,)))
    ks = tl.arange(0, KP)
    idx = tl.where(ks < K, idx, -1)
    v = tl.where(ks < K, v, 0.0)
    _edit_row(x_ptr, o_ptr, m, idx, v, t_ptr, wt_ptr, a_ptr, T, D, stride_xm, stride_om, a_rows, stride_a0, stride_a1,
              scale, clamp, USE_CLAMP, HAS_ALLOWED, BT, BD)


@triton.jit
def _select_edit_kernel(
    x_ptr, key_ptr, cnt_ptr, w_ptr, b_ptr, t_ptr, wt_ptr, a_ptr, o_ptr,
    CAP, N, K, T, D,
    stride_xm, stride_xd, stride_km, stride_wd, stride_wn, stride_om, a_rows, stride_a0, stride_a1,
    scale, clamp,
    USE_CLAMP: tl.constexpr, HAS_ALLOWED: tl.constexpr, KP: tl.constexpr, BS: tl.constexpr,
    BNF: tl.constexpr, BKF: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """The threshold selection's tail fused into the edit (kernels/encode_threshold.py): token m's top K from
    its survivors (or recomputed when they overflowed), then `_edit_row`."""
    m = tl.program_id(0).to(tl.int64)
    v, idx = _unpack_relu(_select_row(key_ptr, cnt_ptr, x_ptr, w_ptr, b_ptr, m, CAP, N, D, stride_km, stride_xm,
                                      stride_xd, stride_wd, stride_wn, KP, BS, BNF, BKF))
    ks = tl.arange(0, KP)
    idx = tl.where(ks < K, idx, -1)
    v = tl.where(ks < K, v, 0.0)
    _edit_row(x_ptr, o_ptr, m, idx, v, t_ptr, wt_ptr, a_ptr, T, D, stride_xm, stride_om, a_rows, stride_a0, stride_a1,
              scale, clamp, USE_CLAMP, HAS_ALLOWED, BT, BD)


def _allowed_args(allowed: Optional[torch.Tensor], M: int,
                  fallback: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(pointer, a_rows, stride_a0, stride_a1) of a [M] or [R, L] (R * L == M, strides kept: an expanded mask is
    read in place) allowed mask; the fallback tensor is passed but never read when there is none."""
    if allowed is None:
        return fallback, 1, 0, 0
    a = allowed if allowed.dim() == 2 else allowed.reshape(1, -1)
    assert a.numel() == M, (tuple(allowed.shape), M)
    return a, a.shape[1], a.stride(0), a.stride(1)


def _edit_residual_fake(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor, w_t: torch.Tensor,
    allowed: torch.Tensor, scale: float, use_clamp: bool, clamp: float,
) -> torch.Tensor:
    return torch.empty_like(x)


@register_op("snce_fast::triton_edit_residual", _edit_residual_fake)
def edit_residual(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor, w_t: torch.Tensor,
    allowed: torch.Tensor, scale: float, use_clamp: bool, clamp: float,
) -> torch.Tensor:
    """x [M, d]; fp32 values and int32 indices [M, k] from encode_topk; targets int32 [T];
    w_t = W_dec[targets] fp32 [T, d] contiguous; allowed int8 [M] -> edited x [M, d]."""
    M, d = x.shape
    k = values.shape[1]
    T = targets.shape[0]
    out = torch.empty_like(x)
    if M == 0:
        return out
    with on_device_of(x):
        wrap_triton(_edit_residual_kernel)[(M,)](
            x, values, indices, targets, w_t, allowed, out,
            k, T, d,
            x.stride(0), values.stride(0), indices.stride(0), out.stride(0),
            float(scale), float(clamp),
            USE_CLAMP=bool(use_clamp), **edit_blocks(k, T, d, interpreting()),
        )
    return out


def _edit_residual_keys_fake(
    x: torch.Tensor, keys: torch.Tensor, k: int, targets: torch.Tensor, w_t: torch.Tensor,
    allowed: Optional[torch.Tensor], scale: float, use_clamp: bool, clamp: float,
) -> torch.Tensor:
    return torch.empty_like(x)


@register_op("snce_fast::triton_edit_residual_keys", _edit_residual_keys_fake)
def edit_residual_keys(
    x: torch.Tensor, keys: torch.Tensor, k: int, targets: torch.Tensor, w_t: torch.Tensor,
    allowed: Optional[torch.Tensor], scale: float, use_clamp: bool, clamp: float,
) -> torch.Tensor:
    """`edit_residual` on the encode kernel's candidate keys [M, S] (`encode_topk.candidate_keys`): the merge to
    the top k happens in the edit kernel, so encode + edit are two launches."""
    M, d = x.shape
    T = targets.shape[0]
    out = torch.empty_like(x)
    if M == 0:
        return out
    a, a_rows, sa0, sa1 = _allowed_args(allowed, M, targets)
    with on_device_of(x):
        wrap_triton(_edit_keys_kernel)[(M,)](
            x, keys, targets, w_t, a, out,
            keys.shape[1], k, T, d,
            x.stride(0), keys.stride(0), out.stride(0), a_rows, sa0, sa1,
            float(scale), float(clamp),
            USE_CLAMP=bool(use_clamp), **edit_keys_blocks(keys.shape[1], k, T, d, interpreting(), allowed is not None),
        )
    return out


def _edit_residual_threshold_fake(
    x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int, targets: torch.Tensor, w_t: torch.Tensor,
    allowed: Optional[torch.Tensor], scale: float, use_clamp: bool, clamp: float,
) -> torch.Tensor:
    return torch.empty_like(x)


@register_op("snce_fast::triton_edit_residual_threshold", _edit_residual_threshold_fake)
def edit_residual_threshold(
    x: torch.Tensor, W_enc: torch.Tensor, bias: torch.Tensor, k: int, targets: torch.Tensor, w_t: torch.Tensor,
    allowed: Optional[torch.Tensor], scale: float, use_clamp: bool, clamp: float,
) -> torch.Tensor:
    """Encode by threshold selection and edit x [M, d] (contiguous rows): three launches in all, the tail's
    top-K selection fused into the edit kernel (`_select_edit_kernel`)."""
    from .encode_threshold import survivors
    M, d = x.shape
    T = targets.shape[0]
    out = torch.empty_like(x)
    if M == 0:
        return out
    s: Survivors = survivors(x, W_enc, bias, k)
    a, a_rows, sa0, sa1 = _allowed_args(allowed, M, targets)
    eb = edit_blocks(k, T, d, interpreting())
    sb = select_blocks(s.plan, interpreting())
    with on_device_of(x):
        wrap_triton(_select_edit_kernel)[(M,)](
            x, s.keys, s.counts, W_enc, bias, targets, w_t, a, out,
            s.plan.CAP, W_enc.shape[1], k, T, d,
            x.stride(0), x.stride(1), s.keys.stride(0), W_enc.stride(0), W_enc.stride(1), out.stride(0),
            a_rows, sa0, sa1,
            float(scale), float(clamp),
            USE_CLAMP=bool(use_clamp), HAS_ALLOWED=allowed is not None, KP=sb["KP"], BS=sb["BS"], BNF=sb["BNF"],
            BKF=sb["BKF"], BT=eb["BT"], BD=eb["BD"], num_warps=max(sb["num_warps"], eb["num_warps"]))
    return out


def edit_blocks(k: int, T: int, d: int, interpreter: bool) -> dict:
    """Block sizes and warps of one `_edit_residual_kernel` launch (shared with `compile_check`)."""
    BD, warps = (min(next_pow2(d), 256), 1) if interpreter else (min(next_pow2(d), 1024), 4)
    return dict(BK=next_pow2(k), BT=max(2, next_pow2(T)), BD=BD, num_warps=warps)


def edit_keys_blocks(S: int, k: int, T: int, d: int, interpreter: bool, has_allowed: bool = True) -> dict:
    """Constexprs and warps of one `_edit_keys_kernel` launch for S candidate keys per token (for `compile_check`):
    the merge's (`merge_blocks`) and the edit's (`edit_blocks`, BK -> KP), the larger warp count."""
    mb, eb = merge_blocks(S, next_pow2(k), interpreter), edit_blocks(k, T, d, interpreter)
    return dict(HAS_ALLOWED=bool(has_allowed), KP=mb["KP"], BS=mb["BS"], BT=eb["BT"], BD=eb["BD"],
                num_warps=max(mb["num_warps"], eb["num_warps"]))

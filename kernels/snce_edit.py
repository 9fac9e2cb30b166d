"""Fused SNCE edit (docs/method.md): encode + TopK (the `encode_topk` kernel), then one
per-token kernel that finds the target latents among the token's k active ones,
applies the scale/clamp rule and writes

    x' = x + sum_{j in T} (z'_j - z_j) W_dec[j]   where a target fires and the token is allowed,
    x' = x (the loaded bits, stored back unchanged) everywhere else.

Registered as `snce_fast::triton_edit_residual`. The reconstruct mode and the gate are
assembled in `snce_fast.kernels.edit` from these ops plus small torch ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._combine import max_combine, sum_combine
from ._registry import on_device_of, register_op
from ._tuning import interpreting, next_pow2


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
    fires = (fires * tl.load(a_ptr + m).to(tl.int32)) > 0
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D
        xv = tl.load(x_ptr + m * stride_xm + cols, mask=cmask, other=0.0)
        w = tl.load(wt_ptr + ts[:, None] * D + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        delta = tl.reduce(coef[:, None] * w, 0, sum_combine)
        edited = (xv.to(tl.float32) + delta).to(xv.dtype)
        tl.store(o_ptr + m * stride_om + cols, tl.where(fires, edited, xv), mask=cmask)


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


def edit_blocks(k: int, T: int, d: int, interpreter: bool) -> dict:
    """Block sizes and warps of one launch (shared with `compile_check`)."""
    BD, warps = (min(next_pow2(d), 256), 1) if interpreter else (min(next_pow2(d), 1024), 4)
    return dict(BK=next_pow2(k), BT=max(2, next_pow2(T)), BD=BD, num_warps=warps)

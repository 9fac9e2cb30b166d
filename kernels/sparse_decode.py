"""Sparse decode: out[m] = sum_i values[m, i] * W_dec[indices[m, i]] + b_dec (fp32 accumulate).

Grid (rows, column blocks of d). Each program gathers its k rows of W_dec (an indirect
load: the row index comes from memory) one BK-slab at a time and reduces them in fp32;
the output is stored in values' dtype. Registered as `snce_fast::triton_sparse_decode`
(distinct from the C++ op `snce_fast::sparse_decode`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._combine import sum_combine
from ._registry import on_device_of, register_op
from ._tuning import interpreting, next_pow2


@triton.jit
def _sparse_decode_kernel(
    v_ptr, i_ptr, w_ptr, b_ptr, o_ptr,
    K, D,
    stride_vm, stride_im, stride_wn, stride_wd, stride_om,
    BK: tl.constexpr, BD: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = cols < D
    acc = tl.zeros((BD,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        idx = tl.load(i_ptr + m * stride_im + ks, mask=kmask, other=0).to(tl.int64)
        v = tl.load(v_ptr + m * stride_vm + ks, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * stride_wn + cols[None, :] * stride_wd, mask=kmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.reduce(v[:, None] * w, 0, sum_combine)
    acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(o_ptr + m * stride_om + cols, acc, mask=cmask)


def decode_blocks(k: int, d: int, interpreter: bool) -> dict:
    """Block sizes and warps of one launch (shared with `compile_check`)."""
    if interpreter:
        return dict(BK=min(next_pow2(k), 256), BD=min(next_pow2(d), 256), num_warps=1)
    bd = min(next_pow2(d), 512)
    return dict(BK=min(next_pow2(k), 32), BD=bd, num_warps=4 if bd >= 256 else 2)


def _sparse_decode_fake(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    return values.new_empty((values.shape[0], W_dec.shape[1]))


@register_op("snce_fast::triton_sparse_decode", _sparse_decode_fake)
def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """values [M, k], indices [M, k] (int32/int64), W_dec [n, d], b_dec [d] -> [M, d] in values' dtype."""
    M, k = values.shape
    d = W_dec.shape[1]
    out = values.new_empty((M, d))
    if M == 0 or k == 0:
        return out.copy_(b_dec.to(out.dtype).expand(M, d)) if M else out
    blocks = decode_blocks(k, d, interpreting())
    with on_device_of(values):
        wrap_triton(_sparse_decode_kernel)[(M, triton.cdiv(d, blocks["BD"]))](
            values, indices, W_dec, b_dec, out,
            k, d,
            values.stride(0), indices.stride(0), W_dec.stride(0), W_dec.stride(1), out.stride(0),
            **blocks,
        )
    return out

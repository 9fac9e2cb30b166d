"""The TopK encoder and decoder with sparse backward passes (docs/training.md, "Sparse backward").

The decode is `F.embedding_bag(indices, W_dec, per_sample_weights=values)`, a gather of k rows,
so the decoder gradient touches only active rows. The encoder (`topk_encode`) computes the
pre-activations densely (the top-k needs them all) but back-propagates through the k (+ aux_k)
selected entries only: grad W_enc = S^T x_c with S the [M, n] matrix holding k non-zeros per
row, never a dense [M, n] product (or, with `sparse=False`, a scatter and two dense matmuls).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["sparse_decode", "topk_encode"]


class _TopKEncode(torch.autograd.Function):
    """Dense encode + TopK forward; backward through the k (+ aux_k) selected entries only.

    Returns (values [M, k], indices [M, k], aux_values [M, a], aux_indices [M, a]);
    values are ReLU'd pre-activations. With `sparse`, grad W_enc = (S^T x_c)^T and
    grad x_c = S W_enc^T are computed from the k non-zeros per row of S.
    """

    @staticmethod
    def forward(ctx, x_c, W_enc, b_enc, k, dead, aux_k, amp_dtype, sparse):  # type: ignore[override]
        if amp_dtype is not None:
            with torch.autocast(device_type=x_c.device.type, dtype=amp_dtype):
                pre = torch.addmm(b_enc, x_c, W_enc)
        else:
            pre = torch.addmm(b_enc, x_c, W_enc)
        top = pre.topk(k, dim=-1, sorted=False)
        vals, idx = top.values.float(), top.indices
        if dead is not None and aux_k > 0:
            aux = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1, sorted=False)
            aux_vals, aux_idx = aux.values.float(), aux.indices
        else:
            aux_vals = vals.new_zeros(vals.shape[0], 0)
            aux_idx = idx.new_zeros(idx.shape[0], 0)
        all_idx = torch.cat([idx, aux_idx], 1)
        live = torch.cat([vals, aux_vals], 1) > 0
        ctx.save_for_backward(x_c, W_enc, all_idx, live)
        ctx.sparse = sparse
        ctx.k = k
        ctx.amp_dtype = amp_dtype
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals.relu(), idx, aux_vals.relu(), aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):  # type: ignore[override]
        x_c, W_enc, idx, live = ctx.saved_tensors
        M, d = x_c.shape
        n = W_enc.shape[1]
        if g_vals is None:
            g_vals = torch.zeros(M, ctx.k, device=x_c.device)
        if g_aux is None:
            g_aux = torch.zeros(M, idx.shape[1] - ctx.k, device=x_c.device)
        g = torch.cat([g_vals, g_aux], 1).float() * live  # [M, k + a]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n, device=x_c.device, dtype=torch.float32).index_add_(0, idx.flatten(), g.flatten())
        if ctx.sparse:
            if ctx.needs_input_grad[1]:
                rows = torch.arange(M, device=x_c.device).repeat_interleave(idx.shape[1])
                S_t = torch.sparse_coo_tensor(
                    torch.stack([idx.flatten(), rows]), g.flatten(), (n, M), check_invariants=False
                )
                grad_W = torch.sparse.mm(S_t, x_c.float()).t()
            if ctx.needs_input_grad[0]:
                grad_x = F.embedding_bag(idx, W_enc.t().float().contiguous(), per_sample_weights=g, mode="sum")
        else:
            # scatter_add: a latent may be in both the main and the aux top-k
            G = torch.zeros(M, n, device=x_c.device, dtype=torch.float32).scatter_add_(1, idx, g)
            amp = ctx.amp_dtype is not None
            with torch.autocast(device_type=x_c.device.type, dtype=ctx.amp_dtype or torch.bfloat16, enabled=amp):
                if ctx.needs_input_grad[1]:
                    grad_W = x_c.t() @ G
                if ctx.needs_input_grad[0]:
                    grad_x = G @ W_enc.t()
            grad_x = grad_x.float() if grad_x is not None else None
        if grad_W is not None:
            grad_W = grad_W.to(W_enc.dtype)
        return grad_x, grad_W, grad_b, None, None, None, None, None

def topk_encode(
    x_c: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    dead: Optional[torch.Tensor] = None,
    aux_k: int = 0,
    amp_dtype: Optional[torch.dtype] = None,
    sparse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TopK-encode centred inputs x_c [M, d]: (values [M, k], indices [M, k], aux_values [M, a],
    aux_indices [M, a]), values ReLU'd. The aux pair holds the top `aux_k` pre-activations among
    the `dead` latents (a = 0 without `dead`). `amp_dtype` runs the encoder matmul under autocast;
    `sparse` selects the sparse encoder backward."""
    return _TopKEncode.apply(x_c, W_enc, b_enc, k, dead, aux_k, amp_dtype, sparse)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """`sum_j values[m, j] * W_dec[indices[m, j]]` as an embedding-bag gather (sparse backward)."""
    if indices.shape[1] == 0:
        return values.new_zeros(values.shape[0], W_dec.shape[1])
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")

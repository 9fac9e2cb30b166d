"""Python faces of the C++ extension's ops (`torch.ops.snce_fast.*`), same semantics as
`snce_fast.reference`. Only ops that beat the reference on the CPU are listed here;
the backend falls back to the reference for the rest."""
from __future__ import annotations

import torch

from snce_fast.checks import check_codes
from snce_fast.ops import _ext

_ext.load()  # the op schemas must exist before their fake kernels are registered


@torch.library.register_fake("snce_fast::sparse_decode")
def _sparse_decode_fake(values, indices, W_dec, b_dec):
    return values.new_empty(values.shape[0], W_dec.shape[1])


def decode(values: torch.Tensor, indices: torch.Tensor, sae) -> torch.Tensor:
    """Sparse decode through the C++ op, for values/indices of any leading shape."""
    check_codes(values, indices)
    lead, k = values.shape[:-1], values.shape[-1]
    out = torch.ops.snce_fast.sparse_decode(
        values.reshape(-1, k), indices.reshape(-1, k).to(torch.int32), sae.W_dec, sae.b_dec
    )
    return out.reshape(*lead, out.shape[-1])


def _decode_setup(ctx, inputs, output):
    values, indices, W_dec, _ = inputs
    ctx.save_for_backward(values, indices, W_dec)


def _decode_backward(ctx, grad):
    """Sparse backward: only the k active rows of W_dec receive gradient."""
    values, indices, W_dec = ctx.saved_tensors
    idx = indices.long()
    g32 = grad.to(torch.promote_types(grad.dtype, torch.float32))
    grad_values = grad_W = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_values = torch.einsum("md,mkd->mk", g32, W_dec.to(g32.dtype)[idx]).to(values.dtype)
    if ctx.needs_input_grad[2]:
        contrib = values.to(g32.dtype).unsqueeze(-1) * g32.unsqueeze(1)  # [M, k, d]
        grad_W = torch.zeros(W_dec.shape, dtype=g32.dtype, device=W_dec.device)
        grad_W.index_add_(0, idx.reshape(-1), contrib.reshape(-1, W_dec.shape[1]))
        grad_W = grad_W.to(W_dec.dtype)
    if ctx.needs_input_grad[3]:
        grad_b = g32.sum(0).to(grad.dtype)
    return grad_values, None, grad_W, grad_b


torch.library.register_autograd("snce_fast::sparse_decode", _decode_backward, setup_context=_decode_setup)

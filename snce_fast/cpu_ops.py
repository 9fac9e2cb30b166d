"""Python faces of the C++ extension's ops (`torch.ops.snce_fast.*`), same semantics as
`snce_fast.reference`. Only ops that beat the reference on the CPU are listed here;
the backend falls back to the reference for the rest."""
from __future__ import annotations

import torch

from . import _ext

_ext.load()  # the op schemas must exist before their fake kernels are registered


@torch.library.register_fake("snce_fast::sparse_decode")
def _sparse_decode_fake(values, indices, W_dec, b_dec):
    return values.new_empty(values.shape[0], W_dec.shape[1])


def decode(values: torch.Tensor, indices: torch.Tensor, sae) -> torch.Tensor:
    """Sparse decode through the C++ op, for values/indices of any leading shape."""
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have one shape")
    lead, k = values.shape[:-1], values.shape[-1]
    out = torch.ops.snce_fast.sparse_decode(
        values.reshape(-1, k), indices.reshape(-1, k).to(torch.int32), sae.W_dec, sae.b_dec
    )
    return out.reshape(*lead, out.shape[-1])

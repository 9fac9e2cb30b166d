"""The SAE fingerprint that scans, scores.json and calibration.json record (`sae_hash`,
docs/formats.md): files made with one SAE are refused with another."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def sae_hash(sae: nn.Module) -> str:
    """sha256 over what a scan's counts depend on: the encoding side of the SAE (W_enc, b_enc, b_dec:
    bytes, shapes, dtypes), k and hook. The decoder is left out, so a slim erasure (ErasureSAE) of an
    SAE matches the scans and score files made with the full SAE."""
    h = hashlib.sha256(f"k={sae.k};hook={sae.hook}".encode())
    for name in ("W_enc", "b_enc", "b_dec"):
        t = getattr(sae, name).detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

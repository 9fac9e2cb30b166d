"""SAE fingerprints. `sae_hash`: what scans, scores.json and calibration.json record (docs/formats.md),
so files made with one SAE are refused with another. `sae_fingerprint`: what an evaluation run records
(docs/evaluation.md), the encoding side plus the decoder rows its edit uses."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from snce_fast.checks import as_neuron_list
from snce_fast.ops.reference import decoder_rows


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


def sae_fingerprint(sae: Any, neurons: Any, mode: str = "residual") -> str:
    """sha256 over what an SAE contributes to the images: its encoding side (sae_hash) and the
    decoder rows the edit uses (W_dec[neurons] in residual mode, all of W_dec otherwise). A slim
    erasure and the full SAE it came from therefore match in residual mode."""
    h = hashlib.sha256(sae_hash(sae).encode())
    targets = as_neuron_list(neurons, sae.n_latents)
    dec = decoder_rows(sae, targets) if mode == "residual" else sae.W_dec
    h.update(json.dumps({"mode": mode, "targets": targets}).encode())
    h.update(dec.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()

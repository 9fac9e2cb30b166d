"""Export an snce_fast SAE in the layouts of SAELens and EleutherAI sparsify (docs/formats.md), so an SAE
trained here loads with `sae_lens.SAE.load_from_disk` / `sparsify.SparseCoder.load_from_disk` and computes
the same codes there. Each directory is written weights first, then its config, each atomically.

Both libraries keep unknown config keys out of their modules, so the exact snce_fast hook point travels
as `snce_fast_hook` (in SAELens' metadata, in sparsify's cfg.json) and the importers read it back.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from snce_fast.records.atomic import atomic_path, json_text
from snce_fast.sae.hooknames import saelens_name

SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"  # SAELens reads configs without a version >= 6.0 with its pre-6.0 rules


def _write(path: str | os.PathLike, weights_file: str, tensors: Mapping[str, torch.Tensor], config_file: str,
           config: Mapping[str, Any]) -> Path:
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    with atomic_path(out / weights_file) as tmp:
        save_file(cpu, str(tmp), metadata={"format": "pt"})
    with atomic_path(out / config_file) as tmp:
        tmp.write_text(json_text(dict(config)))
    return out


def _dtype_name(sae: Any) -> str:
    return str(sae.W_enc.dtype).removeprefix("torch.")


def write_saelens(sae: Any, path: str | os.PathLike) -> Path:
    """`cfg.json` + `sae_weights.safetensors` of a SAELens 6 TopK SAE (architecture "topk", b_dec applied
    to the input, no decoder-norm rescaling, no normalisation): exactly snce_fast's TopK."""
    meta: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "snce_fast_hook": sae.hook}
    name = saelens_name(sae.hook)
    if name is not None:
        meta["hook_name"] = name
    if getattr(sae, "encoder_name", None):
        meta["model_name"] = sae.encoder_name
    config = {"architecture": "topk", "d_in": sae.d_in, "d_sae": sae.n_latents, "k": sae.k,
              "dtype": _dtype_name(sae), "device": "cpu", "apply_b_dec_to_input": True,
              "rescale_acts_by_decoder_norm": False, "normalize_activations": "none", "reshape_activations": "none",
              "metadata": meta}
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    return _write(path, SAELENS_WEIGHTS, tensors, SAELENS_CONFIG, config)


def write_sparsify(sae: Any, path: str | os.PathLike) -> Path:
    """`cfg.json` + `sae.safetensors` of a sparsify SparseCoder (activation "topk", no transcoder, no skip
    connection). sparsify names an SAE's folder after its hookpoint (e.g. `text_model.encoder.layers.8`)."""
    config = {"activation": "topk", "expansion_factor": max(1, sae.n_latents // sae.d_in), "normalize_decoder": True,
              "num_latents": sae.n_latents, "k": sae.k, "multi_topk": False, "skip_connection": False,
              "transcode": False, "d_in": sae.d_in, "snce_fast_hook": sae.hook}
    tensors = {"encoder.weight": sae.W_enc.detach().t(), "encoder.bias": sae.b_enc, "W_dec": sae.W_dec,
               "b_dec": sae.b_dec}
    return _write(path, SPARSIFY_WEIGHTS, tensors, SPARSIFY_CONFIG, config)

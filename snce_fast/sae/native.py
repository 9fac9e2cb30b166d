"""The native SAE directory: config.json + sae.safetensors (docs/formats.md)."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from snce_fast.sae.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    SAEFormatError,
    SAEWeights,
    check_shapes,
    finite_tensors,
    float_dtype,
    read_json,
    read_safetensors,
    require,
    require_int,
    sae_dir,
    take_tensors,
    write_artifact,
)

FORMAT_VERSION = 1
WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def write_sae(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Write a full SAE (weights first, then config.json, each atomically). Saved over an snce_fast
    erasure, its erasure.safetensors is removed afterwards."""
    write_artifact(path, WEIGHTS_FILE, {k: tensors[k] for k in WEIGHT_KEYS},
                   {"format": "snce_fast", "version": str(FORMAT_VERSION)}, config)


def read_sae(path: str | os.PathLike) -> SAEWeights:
    """Load a native snce_fast SAE directory, checking every tensor against the config."""
    p = sae_dir(path)
    cfg = read_json(p / CONFIG_FILE)
    file = str(p / CONFIG_FILE)
    version = require_int(cfg, "format_version", file)
    if version != FORMAT_VERSION:
        raise SAEFormatError(f"{file} has format_version {version!r}; this snce_fast reads version {FORMAT_VERSION}")
    d, n, k = (require_int(cfg, key, file) for key in ("d_in", "n_latents", "k"))
    dtype = float_dtype(require(cfg, "dtype", file), file)
    sd = read_safetensors(p / WEIGHTS_FILE)
    wfile = str(p / WEIGHTS_FILE)
    extra = sorted(set(sd) - set(WEIGHT_KEYS))
    if extra:
        raise SAEFormatError(f"{wfile} has unexpected tensor(s) {extra}: expected exactly {list(WEIGHT_KEYS)}")
    W_enc, b_enc, W_dec, b_dec = take_tensors(sd, WEIGHT_KEYS, wfile)
    check_shapes({"W_enc": (W_enc, (d, n)), "b_enc": (b_enc, (n,)), "W_dec": (W_dec, (n, d)), "b_dec": (b_dec, (d,))}, wfile)
    for name, t in zip(WEIGHT_KEYS, (W_enc, b_enc, W_dec, b_dec)):
        if t.dtype != dtype:
            raise SAEFormatError(f"{wfile}: tensor {name} has dtype {t.dtype}, but {file} says {dtype}")
    finite_tensors(dict(zip(WEIGHT_KEYS, (W_enc, b_enc, W_dec, b_dec))), wfile)
    return SAEWeights(W_enc, b_enc, W_dec, b_dec, k, cfg.get("hook", "output"), cfg.get("encoder"))

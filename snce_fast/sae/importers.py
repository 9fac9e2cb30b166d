"""Importers for SAEs trained elsewhere: SAELens, EleutherAI sparsify and OpenAI-style TopK
checkpoints (docs/formats.md). Each returns the weights of an equivalent snce_fast SAE, with
foreign conventions folded in exactly, or refuses the file naming what it cannot compute.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch

from snce_fast.sae.files import (
    SAEFormatError,
    SAEWeights,
    check_shapes,
    finite_tensors,
    read_json,
    read_safetensors,
    require_int,
    sae_dir,
    take_tensors,
)
from snce_fast.sae.native import WEIGHT_KEYS


def read_saelens(path: str | os.PathLike) -> SAEWeights:
    """Import a SAELens TopK SAE (`cfg.json` + `sae_weights.safetensors`).

    `apply_b_dec_to_input=False` and `rescale_acts_by_decoder_norm=True` are folded into
    the weights exactly; JumpReLU, BatchTopK, gated/standard ReLU SAEs and activation
    normalisation are rejected.
    """
    p = sae_dir(path)
    file = str(p / "cfg.json")
    cfg = read_json(p / "cfg.json")
    arch = str(cfg.get("architecture", "standard")).lower()
    act = str(cfg.get("activation_fn", cfg.get("activation_fn_str", ""))).lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SAEFormatError(f"{file}: activation_fn_kwargs={kwargs!r} is not a JSON object")
    if arch == "topk" or (arch == "standard" and act == "topk"):
        k = require_int(cfg, "k", file, None)
        k = require_int(kwargs, "k", f"{file} (activation_fn_kwargs)", None) if k is None else k
    else:
        raise SAEFormatError(
            f"{file}: architecture {arch!r} (activation {act or 'relu'!r}) is not supported: snce_fast imports TopK SAEs only"
        )
    if k is None:
        raise SAEFormatError(f"{file} has no 'k' for its TopK activation")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAEFormatError(f"{file}: normalize_activations={norm!r} is not supported (expected 'none')")
    d, n = require_int(cfg, "d_in", file), require_int(cfg, "d_sae", file)
    wfile = str(p / "sae_weights.safetensors")
    W_enc, b_enc, W_dec, b_dec = take_tensors(read_safetensors(p / "sae_weights.safetensors"), WEIGHT_KEYS, wfile)
    check_shapes({"W_enc": (W_enc, (d, n)), "b_enc": (b_enc, (n,)), "W_dec": (W_dec, (n, d)), "b_dec": (b_dec, (d,))}, wfile)
    finite_tensors({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, wfile)
    dtype = W_enc.dtype
    W_enc32, b_enc32, W_dec32 = W_enc.float(), b_enc.float(), W_dec.float()
    if not cfg.get("apply_b_dec_to_input", True):
        # x @ W + b  ==  (x - b_dec) @ W + (b + b_dec @ W)
        b_enc32 = b_enc32 + b_dec.float() @ W_enc32
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec32.norm(dim=1)
        W_enc32, b_enc32, W_dec32 = W_enc32 * norms, b_enc32 * norms, W_dec32 / norms[:, None].clamp_min(1e-12)
    hook = hook_from_name((cfg.get("metadata") or {}).get("hook_name", cfg.get("hook_name")))
    encoder = (cfg.get("metadata") or {}).get("model_name", cfg.get("model_name"))
    return SAEWeights(W_enc32.to(dtype), b_enc32.to(dtype), W_dec32.to(dtype), b_dec, int(k), hook, encoder)


def hook_from_name(name: Any) -> str:
    """Best-effort map of a foreign hook name ("...layers.8..." / "layers.8") to a hook spec."""
    m = re.search(r"(?:layers?|blocks?|h)\.(\d+)", str(name or ""))
    return f"layer:{m.group(1)}" if m else "output"


def read_sparsify(path: str | os.PathLike) -> SAEWeights:
    """Import an EleutherAI sparsify SAE (`cfg.json` + `sae.safetensors`).

    sparsify applies ReLU before top-k; ReLU after top-k selects the same positive set, so
    the latents that fire and their values are identical.
    """
    p = sae_dir(path)
    file = str(p / "cfg.json")
    cfg = read_json(p / "cfg.json")
    for flag in ("skip_connection", "transcode", "multi_topk"):
        if cfg.get(flag):
            raise SAEFormatError(f"{file}: {flag}=true is not supported by snce_fast")
    k = require_int(cfg, "k", file)
    wfile = str(p / "sae.safetensors")
    sd = read_safetensors(p / "sae.safetensors")
    enc_w, enc_b, W_dec, b_dec = take_tensors(sd, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), wfile)
    d = require_int(cfg, "d_in", file, 0) or int(enc_w.shape[-1])
    n = require_int(cfg, "num_latents", file, 0) or require_int(cfg, "expansion_factor", file) * d
    named = {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec}
    check_shapes({"encoder.weight": (enc_w, (n, d)), "encoder.bias": (enc_b, (n,)), "W_dec": (W_dec, (n, d)), "b_dec": (b_dec, (d,))}, wfile)
    finite_tensors(named, wfile)
    hook = hook_from_name(cfg.get("hookpoint"))
    return SAEWeights(enc_w.t().contiguous(), enc_b, W_dec, b_dec, int(k), hook, None)


def read_openai(path: str | os.PathLike) -> SAEWeights:
    """Import an OpenAI-style TopK autoencoder (`config.json` + `state_dict.pth`), loaded
    only with `torch.load(weights_only=True)`: `encoder.weight [n, d]`, `decoder.weight [d, n]`,
    `pre_bias [d]`, `latent_bias [n]`."""
    p = sae_dir(path)
    cfg_file = p / "config.json"
    cfg = read_json(cfg_file) if cfg_file.is_file() else {}
    sd_file = p / "state_dict.pth"
    if not sd_file.is_file():
        raise FileNotFoundError(f"{str(sd_file)!r} is missing")
    try:
        sd = torch.load(sd_file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of many kinds: report them all the same way
        raise SAEFormatError(f"{str(sd_file)!r} could not be loaded with weights_only=True: {e}") from None
    if not isinstance(sd, dict):
        raise SAEFormatError(f"{str(sd_file)!r} holds a {type(sd).__name__}, expected a state dict")
    if sd.get("normalize") or cfg.get("normalize"):
        raise SAEFormatError(f"{str(sd_file)!r}: input normalisation is not supported by snce_fast")
    act = str(sd.get("activation", "TopK"))
    if act != "TopK":
        raise SAEFormatError(f"{str(sd_file)!r}: activation {act!r} is not supported (expected TopK)")
    k = require_int(cfg, "k", str(cfg_file), None)
    act_sd = sd.get("activation_state_dict") or {}
    if k is None and isinstance(act_sd, dict):
        k = require_int(act_sd, "k", f"{sd_file} (activation_state_dict)", None)
    if k is None:
        raise SAEFormatError(f"no 'k' in {str(cfg_file)!r} or the state dict's activation_state_dict")
    enc_w, dec_w, pre_bias, latent_bias = take_tensors(sd, ("encoder.weight", "decoder.weight", "pre_bias", "latent_bias"), str(sd_file))
    n, d = enc_w.shape
    check_shapes({"decoder.weight": (dec_w, (d, n)), "pre_bias": (pre_bias, (d,)), "latent_bias": (latent_bias, (n,))}, str(sd_file))
    finite_tensors({"encoder.weight": enc_w, "decoder.weight": dec_w, "pre_bias": pre_bias, "latent_bias": latent_bias},
                   str(sd_file))
    return SAEWeights(enc_w.t().contiguous(), latent_bias, dec_w.t().contiguous(), pre_bias, k, cfg.get("hook", "output"), None)

"""SAE files: the native format (config.json + sae.safetensors) and importers for
SAELens, EleutherAI sparsify and OpenAI-style checkpoints (SPEC sections 6 and 10).

Nothing here unpickles arbitrary objects, and every loader reads and checks all tensors
before building the module, so a bad file raises and loads nothing.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ._atomic import atomic_path
from .sae import SAE

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
ERASURE_FORMAT = "snce_fast-erasure"  # the slim artifact of snce_fast.erasure
ERASURE_WEIGHTS = "erasure.safetensors"


class SAEFormatError(ValueError):
    """A checkpoint is missing, truncated, or does not match its config."""


# -- helpers -----------------------------------------------------------------------
def _dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"SAE directory {str(p)!r} does not exist")
    return p


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} is missing")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{str(file)!r} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{str(file)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _require(cfg: dict[str, Any], key: str, file: str) -> Any:
    if key not in cfg:
        raise SAEFormatError(f"{file} has no {key!r} entry")
    return cfg[key]


def _tensors(sd: dict[str, torch.Tensor], keys: tuple[str, ...], file: str) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise SAEFormatError(f"{file} is missing tensor(s) {missing}; it has {sorted(sd)}")
    return [sd[k] for k in keys]


def _dtype(name: str, file: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise SAEFormatError(f"{file} names dtype {name!r}: expected float32, float16 or bfloat16")
    return dt


def _check_shapes(named: dict[str, tuple[torch.Tensor, tuple[int, ...]]], file: str) -> None:
    for name, (t, shape) in named.items():
        if tuple(t.shape) != tuple(shape):
            raise SAEFormatError(f"{file}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)} from the config")


def _build(W_enc, b_enc, W_dec, b_dec, k, hook, encoder, device) -> SAE:
    sae = SAE.from_tensors(W_enc, b_enc, W_dec, b_dec, k=int(k), hook=hook, encoder=encoder)
    return sae.to(device) if device is not None else sae


def previous_weights(out: Path) -> Optional[Path]:
    """The weights file of the snce_fast artifact (full SAE or erasure) that `out`/config.json
    describes before a save replaces it; None when there is none or the config is not ours."""
    try:
        cfg = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if cfg.get("format") == ERASURE_FORMAT:
        return out / ERASURE_WEIGHTS
    if "format" not in cfg and "format_version" in cfg and "n_latents" in cfg:
        return out / WEIGHTS_FILE
    return None


def drop_replaced(previous: Optional[Path], written: Path) -> None:
    """After a save wrote `written` and its config: remove the weights of the artifact it replaced
    (a full SAE saved over an erasure, or the reverse), which nothing would read any more."""
    if previous is not None and previous.name != written.name:
        previous.unlink(missing_ok=True)


# -- native format -------------------------------------------------------------------
def save_sae(sae: SAE, path: str | os.PathLike) -> None:
    """Write config.json + sae.safetensors into `path`; each file is written to a temp
    name, fsynced and renamed, weights first, so a crash never leaves a config that
    points at a partial weights file. Saved over an snce_fast erasure, its erasure.safetensors
    is removed afterwards."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(sae, k).detach().contiguous().cpu() for k in WEIGHT_KEYS}
    cfg = sae.config()

    def write(name: str, writer) -> None:
        with atomic_path(out / name) as tmp:
            writer(str(tmp))

    previous = previous_weights(out)
    write(WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "snce_fast", "version": str(FORMAT_VERSION)}))
    write(CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))
    drop_replaced(previous, out / WEIGHTS_FILE)


def load_sae(path: str | os.PathLike, device: Optional[torch.device | str] = None) -> SAE:
    """Load a native snce_fast SAE directory, checking every tensor against the config."""
    p = _dir(path)
    cfg = _read_json(p / CONFIG_FILE)
    file = str(p / CONFIG_FILE)
    version = _require(cfg, "format_version", file)
    if version != FORMAT_VERSION:
        raise SAEFormatError(f"{file} has format_version {version!r}; this snce_fast reads version {FORMAT_VERSION}")
    d, n, k = (int(_require(cfg, key, file)) for key in ("d_in", "n_latents", "k"))
    dtype = _dtype(_require(cfg, "dtype", file), file)
    sd = _read_safetensors(p / WEIGHTS_FILE)
    wfile = str(p / WEIGHTS_FILE)
    extra = sorted(set(sd) - set(WEIGHT_KEYS))
    if extra:
        raise SAEFormatError(f"{wfile} has unexpected tensor(s) {extra}: expected exactly {list(WEIGHT_KEYS)}")
    W_enc, b_enc, W_dec, b_dec = _tensors(sd, WEIGHT_KEYS, wfile)
    _check_shapes({"W_enc": (W_enc, (d, n)), "b_enc": (b_enc, (n,)), "W_dec": (W_dec, (n, d)), "b_dec": (b_dec, (d,))}, wfile)
    for name, t in zip(WEIGHT_KEYS, (W_enc, b_enc, W_dec, b_dec)):
        if t.dtype != dtype:
            raise SAEFormatError(f"{wfile}: tensor {name} has dtype {t.dtype}, but {file} says {dtype}")
    return _build(W_enc, b_enc, W_dec, b_dec, k, cfg.get("hook", "output"), cfg.get("encoder"), device)


# -- SAELens (5.x / 6.x TopK) ---------------------------------------------------------------
def load_saelens(path: str | os.PathLike, device: Optional[torch.device | str] = None) -> SAE:
    """Import a SAELens TopK SAE (`cfg.json` + `sae_weights.safetensors`).

    `apply_b_dec_to_input=False` and `rescale_acts_by_decoder_norm=True` are folded into
    the weights exactly; JumpReLU, BatchTopK, gated/standard ReLU SAEs and activation
    normalisation are rejected.
    """
    p = _dir(path)
    file = str(p / "cfg.json")
    cfg = _read_json(p / "cfg.json")
    arch = str(cfg.get("architecture", "standard")).lower()
    act = str(cfg.get("activation_fn", cfg.get("activation_fn_str", ""))).lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch == "topk" or (arch == "standard" and act == "topk"):
        k = cfg.get("k") or kwargs.get("k")
    else:
        raise SAEFormatError(
            f"{file}: architecture {arch!r} (activation {act or 'relu'!r}) is not supported: snce_fast imports TopK SAEs only"
        )
    if k is None:
        raise SAEFormatError(f"{file} has no 'k' for its TopK activation")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAEFormatError(f"{file}: normalize_activations={norm!r} is not supported (expected 'none')")
    d, n = int(_require(cfg, "d_in", file)), int(_require(cfg, "d_sae", file))
    wfile = str(p / "sae_weights.safetensors")
    W_enc, b_enc, W_dec, b_dec = _tensors(_read_safetensors(p / "sae_weights.safetensors"), WEIGHT_KEYS, wfile)
    _check_shapes({"W_enc": (W_enc, (d, n)), "b_enc": (b_enc, (n,)), "W_dec": (W_dec, (n, d)), "b_dec": (b_dec, (d,))}, wfile)
    dtype = W_enc.dtype
    W_enc32, b_enc32, W_dec32 = W_enc.float(), b_enc.float(), W_dec.float()
    if not cfg.get("apply_b_dec_to_input", True):
        # x @ W + b  ==  (x - b_dec) @ W + (b + b_dec @ W)
        b_enc32 = b_enc32 + b_dec.float() @ W_enc32
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec32.norm(dim=1)
        W_enc32, b_enc32, W_dec32 = W_enc32 * norms, b_enc32 * norms, W_dec32 / norms[:, None].clamp_min(1e-12)
    hook = _hook_from_name((cfg.get("metadata") or {}).get("hook_name", cfg.get("hook_name")))
    encoder = (cfg.get("metadata") or {}).get("model_name", cfg.get("model_name"))
    return _build(W_enc32.to(dtype), b_enc32.to(dtype), W_dec32.to(dtype), b_dec, k, hook, encoder, device)


def _hook_from_name(name: Any) -> str:
    """Best-effort map of a foreign hook name ("...layers.8..." / "layers.8") to a hook spec."""
    m = re.search(r"(?:layers?|blocks?|h)\.(\d+)", str(name or ""))
    return f"layer:{m.group(1)}" if m else "output"


# -- EleutherAI sparsify ---------------------------------------------------------------
def load_sparsify(path: str | os.PathLike, device: Optional[torch.device | str] = None) -> SAE:
    """Import an EleutherAI sparsify SAE (`cfg.json` + `sae.safetensors`).

    sparsify applies ReLU before top-k; ReLU after top-k selects the same positive set, so
    the latents that fire and their values are identical.
    """
    p = _dir(path)
    file = str(p / "cfg.json")
    cfg = _read_json(p / "cfg.json")
    for flag in ("skip_connection", "transcode", "multi_topk"):
        if cfg.get(flag):
            raise SAEFormatError(f"{file}: {flag}=true is not supported by snce_fast")
    k = _require(cfg, "k", file)
    wfile = str(p / "sae.safetensors")
    sd = _read_safetensors(p / "sae.safetensors")
    enc_w, enc_b, W_dec, b_dec = _tensors(sd, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), wfile)
    d = int(cfg.get("d_in") or enc_w.shape[-1])
    n = int(cfg.get("num_latents") or 0) or int(_require(cfg, "expansion_factor", file)) * d
    _check_shapes({"encoder.weight": (enc_w, (n, d)), "encoder.bias": (enc_b, (n,)), "W_dec": (W_dec, (n, d)), "b_dec": (b_dec, (d,))}, wfile)
    hook = _hook_from_name(cfg.get("hookpoint"))
    return _build(enc_w.t().contiguous(), enc_b, W_dec, b_dec, k, hook, None, device)


# -- OpenAI sparse_autoencoder style (ItD, Concept Steerers) ------------------------------------
def load_openai(path: str | os.PathLike, device: Optional[torch.device | str] = None) -> SAE:
    """Import an OpenAI-style TopK autoencoder (`config.json` + `state_dict.pth`), loaded
    only with `torch.load(weights_only=True)`: `encoder.weight [n, d]`, `decoder.weight [d, n]`,
    `pre_bias [d]`, `latent_bias [n]`."""
    p = _dir(path)
    cfg_file = p / "config.json"
    cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
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
    k = cfg.get("k") or (sd.get("activation_state_dict") or {}).get("k")
    if k is None:
        raise SAEFormatError(f"no 'k' in {str(cfg_file)!r} or the state dict's activation_state_dict")
    enc_w, dec_w, pre_bias, latent_bias = _tensors(sd, ("encoder.weight", "decoder.weight", "pre_bias", "latent_bias"), str(sd_file))
    n, d = enc_w.shape
    _check_shapes({"decoder.weight": (dec_w, (d, n)), "pre_bias": (pre_bias, (d,)), "latent_bias": (latent_bias, (n,))}, str(sd_file))
    k = int(k.item() if isinstance(k, torch.Tensor) else k)
    return _build(enc_w.t().contiguous(), latent_bias, dec_w.t().contiguous(), pre_bias, k, cfg.get("hook", "output"), None, device)

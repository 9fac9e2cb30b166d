"""Importers for SAEs trained elsewhere: SAELens, EleutherAI sparsify and OpenAI's `sparse_autoencoder`
layout (docs/formats.md). Each returns the weights of an snce_fast SAE that computes what the library's
own loader and forward compute (folded exactly where the conventions differ), or refuses the file with
one line naming the file, the field and the value it cannot compute. tests/sae/test_peer_libraries.py
checks them against the real libraries.

Every importer takes `hook=` (the hook point, replacing what the files say or what had to be guessed)
and `dtype=` (the dtype of the result; foreign conventions are folded in float32 first). A hook that
had to be guessed is reported on the `snce_fast` logger (snce_fast.log) as a warning.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from snce_fast.checks import parse_hook
from snce_fast.sae.files import (
    SAEFormatError,
    SAEWeights,
    as_dtype,
    check_shapes,
    finite_tensors,
    float_dtype,
    read_json,
    read_safetensors,
    require_int,
    sae_dir,
    take_tensors,
)
from snce_fast.sae.hooknames import inside_block, module_hook, saelens_hook
from snce_fast.sae.native import WEIGHT_KEYS

log = logging.getLogger(__name__)


def choose_hook(given: Optional[str], infer: Callable[[], Optional[str]], where: str, source: str) -> str:
    """`given` (the caller's hook=) when set; otherwise what `infer()` reads from the files, or "output"
    with a warning when they say nothing snce_fast recognises (`source`: where it looked)."""
    if given is not None:
        hook = parse_hook(given)
        log.info("%s: hook=%r as given", where, hook)
        return hook
    hook = infer()
    if hook is None:
        log.warning("%s: %s names no hook point snce_fast recognises; assuming hook='output' (the tensor the "
                    "pipeline reads). If the SAE was trained elsewhere, pass hook='layer:N'", where, source)
        return "output"
    log.info("%s: hook %r (from %s)", where, hook, source)
    return hook


def check_args(hook: Optional[str], dtype: Any) -> None:
    """The caller's hook= and dtype=, checked before any file is read."""
    if hook is not None:
        parse_hook(hook)
    if dtype is not None:
        as_dtype(dtype)


def file_hook(value: Any, where: str) -> str:
    """A hook point stored in a file (`where`: the file and key), checked like hook=."""
    try:
        return parse_hook(value)
    except ValueError:
        raise SAEFormatError(f"{where}={value!r} is not a hook point: expected 'output' or 'layer:N'") from None


def _result(tensors32: tuple[torch.Tensor, ...], b_dec: torch.Tensor, k: int, hook: str, encoder: Any,
            dtype: torch.dtype) -> SAEWeights:
    W_enc, b_enc, W_dec = (t.to(dtype) for t in tensors32)
    return SAEWeights(W_enc, b_enc, W_dec, b_dec.to(dtype), int(k), hook,
                      encoder if isinstance(encoder, str) else None)


# -- SAELens -----------------------------------------------------------------------------------------
def _saelens_config(raw: dict[str, Any]) -> dict[str, Any]:
    """SAELens' own reading of a config, as far as it decides what the SAE computes: pre-6.0 key names
    (hook_point, hook_point_head_index, activation_fn_str) renamed, metadata folded in, and the old
    boolean normalize_activations read as SAELens reads it (false -> "none")."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    cfg = {renames.get(key, key): value for key, value in raw.items()}
    meta = cfg.get("metadata")
    if isinstance(meta, dict):
        for key in ("hook_name", "hook_head_index", "model_name", "snce_fast_hook"):
            if meta.get(key) is not None:
                cfg[key] = meta[key]
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool):
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    return cfg


def _saelens_k(cfg: dict[str, Any], file: str) -> int:
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SAEFormatError(f"{file}: activation_fn_kwargs={kwargs!r} is not a JSON object")
    if not (arch == "topk" or (arch == "standard" and act == "topk")):
        shown = f"architecture={arch!r}" + (f", activation_fn={act!r}" if act is not None else "")
        raise SAEFormatError(f"{file}: {shown} is not supported: snce_fast imports TopK SAEs only (architecture "
                             "'topk', or a pre-6.0 'standard' SAE with activation_fn 'topk')")
    k = require_int(cfg, "k", file, None)
    k = require_int(kwargs, "k", f"{file} (activation_fn_kwargs)", None) if k is None else k
    if k is None:
        raise SAEFormatError(f"{file} has no 'k' for its TopK activation (neither 'k' nor activation_fn_kwargs.k)")
    return k


def _saelens_refusals(cfg: dict[str, Any], file: str) -> None:
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        why = {"expected_average_only_in": "inputs scaled by a dataset constant that is not in these files (fold "
                                           "it with SAELens' fold_activation_norm_scaling_factor and save again)",
               "layer_norm": "a per-token layer norm of the input, undone on the output",
               "constant_norm_rescale": "a per-token rescaling of the input, undone on the output"}
        raise SAEFormatError(f"{file}: normalize_activations={norm!r} is not supported: the SAE expects "
                             f"{why.get(norm, 'a normalisation of its input')}, which an snce_fast SAE does not "
                             "compute (only 'none' imports)")
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise SAEFormatError(f"{file}: reshape_activations={cfg['reshape_activations']!r} is not supported: the SAE "
                             "reads attention heads (hook_z), not a residual stream snce_fast can patch")
    if cfg.get("hook_head_index") is not None:
        raise SAEFormatError(f"{file}: hook_head_index={cfg['hook_head_index']!r} is not supported: the SAE reads "
                             "one attention head, not a residual stream snce_fast can patch")


def _saelens_tensors(p: Path, d: int, n: int) -> list[torch.Tensor]:
    wfile = str(p / "sae_weights.safetensors")
    sd = read_safetensors(p / "sae_weights.safetensors")
    scale = sd.pop("scaling_factor", None)  # SAELens drops an all-ones scaling factor and applies any other
    if scale is not None and not bool((scale == 1).all()):
        raise SAEFormatError(f"{wfile}: scaling_factor is not all ones: a finetuning scaling factor is not "
                             "supported (fold it into W_dec first)")
    extra = sorted(set(sd) - set(WEIGHT_KEYS))
    if extra:
        raise SAEFormatError(f"{wfile} has tensor(s) {extra} that a TopK SAE does not have: expected "
                             f"{list(WEIGHT_KEYS)}")
    W_enc, b_enc, W_dec, b_dec = take_tensors(sd, WEIGHT_KEYS, wfile)
    check_shapes({"W_enc": (W_enc, (d, n)), "b_enc": (b_enc, (n,)), "W_dec": (W_dec, (n, d)), "b_dec": (b_dec, (d,))},
                 wfile)
    finite_tensors({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, wfile)
    return [W_enc, b_enc, W_dec, b_dec]


def read_saelens(path: str | os.PathLike, hook: Optional[str] = None, dtype: Any = None) -> SAEWeights:
    """Import a SAELens TopK SAE (`cfg.json` + `sae_weights.safetensors`, SAELens 5.x or 6.x) as
    `SAE.load_from_disk` reads it. `apply_b_dec_to_input=False` and `rescale_acts_by_decoder_norm=True`
    are folded into the weights exactly. The dtype is `dtype`, else the config's, else the file's."""
    check_args(hook, dtype)
    p = sae_dir(path)
    file = str(p / "cfg.json")
    cfg = _saelens_config(read_json(p / "cfg.json"))
    k = _saelens_k(cfg, file)
    _saelens_refusals(cfg, file)
    d, n = require_int(cfg, "d_in", file), require_int(cfg, "d_sae", file)
    W_enc, b_enc, W_dec, b_dec = _saelens_tensors(p, d, n)
    target = as_dtype(dtype) if dtype is not None else (
        float_dtype(cfg["dtype"], file) if cfg.get("dtype") is not None else W_enc.dtype)
    # SAELens computes in its config dtype: cast first, then fold in float32
    W_enc32, b_enc32, W_dec32, b_dec32 = (t.to(target).float() for t in (W_enc, b_enc, W_dec, b_dec))
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc32 = b_enc32 + b_dec32 @ W_enc32  # x @ W + b == (x - b_dec) @ W + (b + b_dec @ W)
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec32.norm(dim=1)  # pre-activations times the norms, activations divided by them
        W_enc32, b_enc32, W_dec32 = W_enc32 * norms, b_enc32 * norms, W_dec32 / norms[:, None].clamp_min(1e-12)

    def infer() -> Optional[str]:
        if cfg.get("snce_fast_hook") is not None:  # written by SAE.save_saelens: exact
            return file_hook(cfg["snce_fast_hook"], f"{file}: snce_fast_hook")
        name = cfg.get("hook_name")
        return None if name is None else saelens_hook(str(name), f"{file}: hook_name")

    where = f"SAELens SAE {str(p)!r}"
    return _result((W_enc32, b_enc32, W_dec32), b_dec32, k, choose_hook(hook, infer, where, "cfg.json's hook_name"),
                   cfg.get("model_name"), target)


# -- sparsify ----------------------------------------------------------------------------------------
def _sparsify_refusals(cfg: dict[str, Any], file: str) -> None:
    act = cfg.get("activation", "topk")
    if act == "groupmax":
        raise SAEFormatError(f"{file}: activation='groupmax' is not supported: sparsify's groupmax keeps the "
                             "largest latent of each of k contiguous groups of n/k latents, while an snce_fast SAE "
                             "keeps the k largest of all n (a different code); only activation 'topk' imports")
    if act != "topk":
        raise SAEFormatError(f"{file}: activation={act!r} is not supported (expected 'topk')")
    for flag, why in (("transcode", "it predicts another module's output from its input"),
                      ("skip_connection", "its W_skip adds a linear map of the input to the output")):
        if cfg.get(flag):
            raise SAEFormatError(f"{file}: {flag}={cfg[flag]!r} is not supported: {why}, which an snce_fast SAE "
                                 "does not compute")


def _sparsify_hook(p: Path, cfg: dict[str, Any]) -> Optional[str]:
    """sparsify writes no hook into cfg.json: the folder is named after the hookpoint (a module path such
    as text_model.encoder.layers.1, with a /seedN subfolder when several seeds were trained)."""
    if cfg.get("snce_fast_hook") is not None:  # written by SAE.save_sparsify: exact
        return file_hook(cfg["snce_fast_hook"], f"{p / 'cfg.json'}: snce_fast_hook")
    folder = Path(os.path.abspath(p))
    name = folder.parent.name if re.fullmatch(r"seed\d+", folder.name) else folder.name
    name = str(cfg.get("hookpoint") or name)
    hook = module_hook(name)
    if hook is None and inside_block(name):
        raise SAEFormatError(f"{folder}: the hookpoint {name!r} (sparsify names the folder after it) is a module "
                             "inside an encoder block, not a block output snce_fast can patch; pass hook= only if "
                             "the SAE really reads a block's output")
    return hook


def read_sparsify(path: str | os.PathLike, hook: Optional[str] = None, dtype: Any = None) -> SAEWeights:
    """Import an EleutherAI sparsify SAE (`cfg.json` + `sae.safetensors`) as `SparseCoder.load_from_disk`
    reads it. sparsify applies ReLU before top-k; ReLU after top-k fires the same latents with the same
    values. `multi_topk` only changes training and is accepted; groupmax, transcoders and skip
    connections are refused. The hook comes from the folder name (sparsify's hookpoint)."""
    check_args(hook, dtype)
    p = sae_dir(path)
    file = str(p / "cfg.json")
    cfg = read_json(p / "cfg.json")
    _sparsify_refusals(cfg, file)
    k = require_int(cfg, "k", file)
    wfile = str(p / "sae.safetensors")
    sd = read_safetensors(p / "sae.safetensors")
    enc_w, enc_b, W_dec, b_dec = take_tensors(sd, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), wfile)
    extra = sorted(set(sd) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise SAEFormatError(f"{wfile} has tensor(s) {extra} that a sparsify TopK SAE does not have")
    d = require_int(cfg, "d_in", file, 0) or int(enc_w.shape[-1])
    n = require_int(cfg, "num_latents", file, 0) or require_int(cfg, "expansion_factor", file) * d
    named = {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec}
    check_shapes({"encoder.weight": (enc_w, (n, d)), "encoder.bias": (enc_b, (n,)), "W_dec": (W_dec, (n, d)),
                  "b_dec": (b_dec, (d,))}, wfile)
    finite_tensors(named, wfile)
    # sparsify builds its module in the dtype of the file's first tensor and loads every tensor into it
    target = as_dtype(dtype) if dtype is not None else named[sorted(named)[0]].dtype
    enc32, b32, dec32, bdec32 = (t.to(target).float() for t in (enc_w, enc_b, W_dec, b_dec))
    where = f"sparsify SAE {str(p)!r}"
    hook = choose_hook(hook, lambda: _sparsify_hook(p, cfg), where, "the folder name (sparsify's hookpoint)")
    return _result((enc32.t().contiguous(), b32, dec32), bdec32, k, hook, None, target)


# -- OpenAI ------------------------------------------------------------------------------------------
_OPENAI_BUFFERS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")


def _openai_state_dict(sd_file: Path) -> dict[str, Any]:
    if not sd_file.is_file():
        raise FileNotFoundError(f"{str(sd_file)!r} is missing")
    try:
        sd = torch.load(sd_file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of many kinds: report them all the same way
        raise SAEFormatError(f"{str(sd_file)!r} could not be loaded with weights_only=True: {e}") from None
    if not isinstance(sd, dict):
        raise SAEFormatError(f"{str(sd_file)!r} holds a {type(sd).__name__}, expected a state dict")
    return sd


def _openai_k(sd: dict[str, Any], cfg: dict[str, Any], sd_file: str, cfg_file: str) -> int:
    """k, after the activation checks: OpenAI's `Autoencoder.from_state_dict` reads `activation` (default
    'ReLU') and TopK's `activation_state_dict` {k, postact_fn}."""
    act = sd.get("activation", "ReLU")
    if act != "TopK":
        note = "" if "activation" in sd else " (the state dict has no 'activation'; OpenAI's loader reads it as ReLU)"
        raise SAEFormatError(f"{sd_file}: activation={act!r} is not supported{note}: snce_fast imports TopK "
                             "autoencoders only")
    act_sd = sd.get("activation_state_dict", {})
    if not isinstance(act_sd, dict):
        raise SAEFormatError(f"{sd_file}: activation_state_dict={act_sd!r} is not a dict")
    post = act_sd.get("postact_fn", "ReLU")
    if post != "ReLU":
        raise SAEFormatError(f"{sd_file}: activation_state_dict.postact_fn={post!r} is not supported: TopK with "
                             f"{post} keeps negative top-k values, while an snce_fast SAE applies ReLU to them "
                             "(only 'ReLU' imports)")
    k_sd = require_int(act_sd, "k", f"{sd_file} (activation_state_dict)", None)
    k_cfg = require_int(cfg, "k", cfg_file, None)
    if k_sd is not None and k_cfg is not None and k_sd != k_cfg:
        raise SAEFormatError(f"{cfg_file}: k={k_cfg} differs from the state dict's activation_state_dict.k={k_sd}")
    k = k_sd if k_sd is not None else k_cfg
    if k is None:
        raise SAEFormatError(f"no 'k' in {cfg_file!r} or the state dict's activation_state_dict ({sd_file})")
    return k


def _openai_normalize(sd: dict[str, Any], cfg: dict[str, Any], sd_file: str, cfg_file: str) -> None:
    """OpenAI's `Autoencoder.from_state_dict` turns on its input layer norm for every TopK state dict
    (normalize=True): latents of LN(x), reconstruction times the token's std plus its mean. An snce_fast
    SAE cannot compute that (its decode has no per-token mean and std), so such a file is refused unless
    config.json states that the autoencoder runs without it."""
    if sd.get("normalize") or cfg.get("normalize"):
        raise SAEFormatError(f"{cfg_file if cfg.get('normalize') else sd_file}: normalize=True (an input layer "
                             "norm) is not supported: an snce_fast SAE encodes x itself, without a per-token "
                             "layer norm")
    if cfg.get("normalize") is False:
        return
    raise SAEFormatError(f"{sd_file}: activation='TopK' with no 'normalize' in {cfg_file}: OpenAI's "
                         "Autoencoder.from_state_dict runs every TopK autoencoder with an input layer norm "
                         "(normalize=True), which an snce_fast SAE does not compute. If this one was trained and is "
                         "run without it, write \"normalize\": false into config.json beside it")


def read_openai(path: str | os.PathLike, hook: Optional[str] = None, dtype: Any = None) -> SAEWeights:
    """Import an autoencoder in OpenAI's `sparse_autoencoder` layout (`state_dict.pth` as its
    `Autoencoder.state_dict()` writes it, + `config.json`), loaded only with
    `torch.load(weights_only=True)`: `encoder.weight [n, d]`, `decoder.weight [d, n]`, `pre_bias [d]`,
    `latent_bias [n]`, `activation` 'TopK', `activation_state_dict` {k, postact_fn 'ReLU'}. config.json
    must say `"normalize": false` (see `_openai_normalize`); its `hook` names the hook point."""
    check_args(hook, dtype)
    p = sae_dir(path)
    cfg_path, sd_path = p / "config.json", p / "state_dict.pth"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    sd = _openai_state_dict(sd_path)
    sd_file, cfg_file = str(sd_path), str(cfg_path)
    k = _openai_k(sd, cfg, sd_file, cfg_file)
    _openai_normalize(sd, cfg, sd_file, cfg_file)
    keys = ("encoder.weight", "decoder.weight", "pre_bias", "latent_bias")
    enc_w, dec_w, pre_bias, latent_bias = take_tensors(sd, keys, sd_file)
    extra = sorted(set(sd) - set(keys) - set(_OPENAI_BUFFERS) - {"activation", "activation_state_dict", "normalize"})
    if extra:
        raise SAEFormatError(f"{sd_file} has entries {extra} that OpenAI's Autoencoder does not have")
    if enc_w.dim() != 2:
        raise SAEFormatError(f"{sd_file}: tensor encoder.weight has shape {tuple(enc_w.shape)}, expected [n, d]")
    n, d = enc_w.shape
    check_shapes({"decoder.weight": (dec_w, (d, n)), "pre_bias": (pre_bias, (d,)), "latent_bias": (latent_bias, (n,))},
                 sd_file)
    finite_tensors(dict(zip(keys, (enc_w, dec_w, pre_bias, latent_bias))), sd_file)
    target = as_dtype(dtype) if dtype is not None else enc_w.dtype
    enc32, dec32, pre32, lat32 = (t.to(target).float() for t in (enc_w, dec_w, pre_bias, latent_bias))

    def infer() -> Optional[str]:
        return None if cfg.get("hook") is None else file_hook(cfg["hook"], f"{cfg_file}: hook")

    hook = choose_hook(hook, infer, f"OpenAI-layout SAE {str(p)!r}", "config.json's hook")
    return _result((enc32.t().contiguous(), lat32, dec32.t().contiguous()), pre32, k, hook, cfg.get("encoder"), target)

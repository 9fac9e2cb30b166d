"""What every SAE file format here shares: the error type, checked JSON/safetensors reads, and the
atomic weights-then-config write (so a crash never leaves a config pointing at partial weights).

Nothing in snce_fast.sae unpickles arbitrary objects, and every loader reads and checks all tensors
before building a module, so a bad file raises and loads nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import torch

from snce_fast.checks import check_finite
from snce_fast.records.atomic import atomic_path, json_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"  # the native full SAE (snce_fast.sae.native)
ERASURE_FORMAT = "snce_fast-erasure"  # the slim artifact (snce_fast.sae.erasure)
ERASURE_WEIGHTS = "erasure.safetensors"


class SAEWeights(NamedTuple):
    """An SAE read from a file, before it becomes a module: W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d]."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    k: int
    hook: str = "output"
    encoder: Optional[str] = None


class SAEFormatError(ValueError):
    """A checkpoint is missing, truncated, or does not match its config."""


# -- helpers -----------------------------------------------------------------------
def sae_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"SAE directory {str(p)!r} does not exist")
    return p


def read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} is missing")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{str(file)!r} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{str(file)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def require(cfg: dict[str, Any], key: str, file: str) -> Any:
    if key not in cfg:
        raise SAEFormatError(f"{file} has no {key!r} entry")
    return cfg[key]


_REQUIRED: Any = object()


def int_value(value: Any, key: str, file: str) -> int:
    """`value` (the entry `key` of `file`) as an int: an int, or a float with an integral value such as
    8.0; anything else (8.7, "8", [8], null, true, a NaN) raises SAEFormatError naming file, key and value."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:  # a k stored in a state dict
        value = value.item()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise SAEFormatError(f"{file}: {key}={value!r} is not an integer: expected a whole number such as 8")


def require_int(cfg: Mapping[str, Any], key: str, file: str, default: Any = _REQUIRED) -> Any:
    """The integer entry `key` of the config `cfg` read from `file`, checked with `int_value`. Without
    `default` the entry must be there (null is refused); with one, a missing or null entry gives it."""
    if default is not _REQUIRED and cfg.get(key) is None:
        return default
    return int_value(require(cfg, key, file), key, file)


def finite_tensors(named: Mapping[str, torch.Tensor], file: str) -> None:
    """SAEFormatError naming `file` and the tensor when a tensor read from it holds NaN or inf."""
    try:
        check_finite(named, file)
    except ValueError as e:
        raise SAEFormatError(str(e)) from None


def take_tensors(sd: dict[str, torch.Tensor], keys: tuple[str, ...], file: str) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise SAEFormatError(f"{file} is missing tensor(s) {missing}; it has {sorted(sd)}")
    return [sd[k] for k in keys]


def float_dtype(name: str, file: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise SAEFormatError(f"{file} names dtype {name!r}: expected float32, float16 or bfloat16")
    return dt


def as_dtype(value: Any, what: str = "dtype") -> torch.dtype:
    """The `dtype=` argument of a loader: a floating torch.dtype or its name ("float32", "torch.bfloat16")."""
    dt = value
    if isinstance(value, str):
        dt = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"{what}={value!r} is not a dtype: expected torch.float32, torch.float16, torch.bfloat16 "
                        "or one of their names")
    if not dt.is_floating_point:
        raise ValueError(f"{what}={value!r} is not a floating-point dtype: expected float32, float16 or bfloat16")
    return dt


def check_shapes(named: dict[str, tuple[torch.Tensor, tuple[int, ...]]], file: str) -> None:
    for name, (t, shape) in named.items():
        if tuple(t.shape) != tuple(shape):
            raise SAEFormatError(f"{file}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)} from the config")


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


def write_artifact(path: str | os.PathLike, weights_file: str, tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str], config: Mapping[str, Any]) -> None:
    """Write `weights_file` then config.json into directory `path`, each to a temp name, fsynced and
    renamed; then remove the weights of a different artifact this save replaced."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cpu = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    previous = previous_weights(out)
    with atomic_path(out / weights_file) as tmp:
        save_file(cpu, str(tmp), metadata=dict(metadata))
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json_text(dict(config)))
    drop_replaced(previous, out / weights_file)

"""Argument checks shared by the reference, the kernels and the public API."""
from __future__ import annotations

import math
import numbers
import re
from typing import Mapping, Optional, Sequence, Union

import torch

Neurons = Union[int, Sequence[int], torch.Tensor]

EDIT_MODES = ("residual", "reconstruct")


def given_neurons(neurons: Neurons) -> list[int]:
    """`neurons` (an int, a sequence of ints or an integer tensor) as a list of ints in the order given; no
    range check. Anything else (a string, floats, bools) is refused: it would name other latents silently."""
    if isinstance(neurons, torch.Tensor):
        if neurons.is_floating_point() or neurons.is_complex() or neurons.dtype == torch.bool:
            raise TypeError(f"neurons is a {neurons.dtype} tensor: expected an integer tensor of latent indices")
        neurons = neurons.flatten().tolist()
    if isinstance(neurons, (bool, str, bytes)):
        raise TypeError(f"neurons must be an int or a list of ints, got {type(neurons).__name__} {neurons!r}")
    if isinstance(neurons, numbers.Integral):
        neurons = [neurons]
    try:
        items = list(neurons)
    except TypeError:
        raise TypeError(f"neurons must be an int or a list of ints, got {neurons!r}") from None
    bad = [j for j in items if isinstance(j, bool) or not isinstance(j, numbers.Integral)]
    if bad:
        raise TypeError(f"neurons must be an int or a list of ints, got {neurons!r} ({bad[0]!r} is a "
                        f"{type(bad[0]).__name__})")
    if not items:
        raise ValueError("neurons is empty: expected at least one latent index")
    return [int(j) for j in items]


def as_neuron_list(neurons: Neurons, n_latents: int) -> list[int]:
    """Normalise `neurons` (an int, a sequence or a 1-D tensor) to a sorted list of unique ints."""
    out = given_neurons(neurons)
    bad = [j for j in out if not 0 <= j < n_latents]
    if bad:
        raise ValueError(f"neuron index {bad[0]} out of range: expected 0 <= j < n_latents={n_latents}")
    return sorted(set(out))


def unique_neurons(neurons: Neurons, n_latents: int) -> list[int]:
    """`as_neuron_list`'s checks, but the neurons keep the order given (repeats dropped): for values
    given per neuron in that order (e.g. one threshold each)."""
    as_neuron_list(neurons, n_latents)
    return list(dict.fromkeys(given_neurons(neurons)))


def check_fpr(fpr: float, name: str = "fpr") -> float:
    """A false-positive rate to calibrate at: a number with 0 <= fpr < 1."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 <= fpr < 1.0:
        raise ValueError(f"{name}={fpr!r} is invalid: expected a float with 0 <= fpr < 1")
    return float(fpr)


def check_edit_args(mode: str, scale: float, clamp: float | None) -> None:
    """The edit rule: a known mode and one finite rule (scale, or clamp with scale left at 0)."""
    for name, value in (("scale", scale), ("clamp", clamp)):
        if value is None and name == "clamp":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} is not a finite number: a NaN or infinite {name} would put "
                             "NaN/inf into the edited embeddings")
    if mode not in EDIT_MODES:
        raise ValueError(f"mode={mode!r} is not supported: expected one of {EDIT_MODES}")
    if clamp is not None and scale != 0.0:
        raise ValueError(
            f"give either scale (got {scale}) or clamp (got {clamp}), not both: "
            "a clamp rule replaces the scale rule"
        )


def check_activations(x: torch.Tensor, d_in: int, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"{what} has shape {tuple(x.shape)}: expected [..., d_in={d_in}]")
    if not x.is_floating_point():
        raise TypeError(f"{what} has dtype {x.dtype}: expected a floating-point tensor")


def check_k(k: int, n_latents: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_latents:
        raise ValueError(f"k={k!r} is invalid: expected an int with 1 <= k <= n_latents={n_latents}")


def check_codes(values: torch.Tensor, indices: torch.Tensor) -> None:
    """A sparse code: top-k values and their latent indices, one shape [..., k]."""
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must have one shape")


def check_finite(tensors: Mapping[str, torch.Tensor], where: Optional[str] = None) -> None:
    """ValueError naming the first tensor that holds NaN or inf ("b_enc has 3 NaN/inf values"), prefixed
    with `where` (a file, or which SAE) when given. One `torch.isfinite(t).all()` per tensor; the bad
    values are counted only on failure."""
    for name, t in tensors.items():
        t = t.detach()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int(t.numel() - int(torch.isfinite(t).sum()))
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}{name} has {bad} NaN/inf values (of {t.numel()}): expected finite weights; "
                             "NaN/inf weights would silently make every code and edit NaN or wrong")


def positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive int")
    return value


_HOOK_RE = re.compile(r"^(output|layer:(-?\d+))$")


def parse_hook(hook: str) -> str:
    """Validate a hook spec: `"output"` or `"layer:N"` (N may be negative)."""
    if not isinstance(hook, str) or not _HOOK_RE.match(hook.strip()):
        raise ValueError(f"hook={hook!r} is not a hook point: expected 'output' or 'layer:N' (e.g. 'layer:8')")
    return hook.strip()

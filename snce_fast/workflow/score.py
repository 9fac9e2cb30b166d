"""Scoring latents from a scan (docs/method.md): which latent stands for the target concept.

Methods: `snce` (default) f_T * log((f_T + eps) / (f_R + eps)), eps = 1 / (n_prompts[R] + 1),
0 where f_T <= f_R; `youden` f_T - f_R; `saeuron` p_T - p_R with p_g = mean_act_g / sum(mean_act_g);
`itd` latents in some target prompt's top-`itd_top` and in no reference prompt's (valued by the
share of target prompts that have them, 0 outside the set). With several reference groups each
latent gets its minimum score over them: the strongest reference wins.

`level="token"` (snce / youden) uses token-level frequencies tokens_fired / n_tokens instead.
`threshold_at_fpr` turns per-prompt activations of reference prompts into the firing threshold
that flags at most a given share of them (the calibrated gate rule, docs/identification.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from snce_fast.workflow.scan_stats import ScanStats

METHODS = ("snce", "youden", "saeuron", "itd")
LEVELS = ("prompt", "token")


@dataclass
class Scores:
    """`values` float64 [n] (higher = more specific to the target); `top(n)` the n best latents."""

    values: torch.Tensor
    method: str
    target: str
    reference: list[str]

    def top(self, n: int = 1) -> list[int]:
        """The n best latents, best first (ties: lower index first)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} is invalid: expected a positive int")
        order = torch.sort(self.values.cpu(), descending=True, stable=True).indices
        return order[:n].tolist()

    def __len__(self) -> int:
        return int(self.values.numel())


def _snce(stats: ScanStats, t: str, r: str, level: str = "prompt") -> torch.Tensor:
    if level == "token":
        f_t, f_r = stats.token_frequency(t), stats.token_frequency(r)
        eps = 1.0 / (int(stats.n_tokens[stats.index(r)]) + 1)
    else:
        f_t, f_r = stats.frequency(t), stats.frequency(r)
        eps = 1.0 / (int(stats.n_prompts[stats.index(r)]) + 1)
    s = f_t * torch.log((f_t + eps) / (f_r + eps))
    return torch.where(f_t > f_r, s, torch.zeros_like(s))


def _youden(stats: ScanStats, t: str, r: str, level: str = "prompt") -> torch.Tensor:
    if level == "token":
        return stats.token_frequency(t) - stats.token_frequency(r)
    return stats.frequency(t) - stats.frequency(r)


def _saeuron(stats: ScanStats, t: str, r: str) -> torch.Tensor:
    def share(g: str) -> torch.Tensor:
        m = stats.mean_activation(g)
        total = float(m.sum())
        return m / total if total > 0 else torch.zeros_like(m)

    return share(t) - share(r)


def _itd(stats: ScanStats, t: str, r: str) -> torch.Tensor:
    g_t, g_r = stats.index(t), stats.index(r)
    share = stats.itd_prompts[g_t].double() / max(int(stats.n_prompts[g_t]), 1)
    return torch.where(stats.itd_prompts[g_r] == 0, share, torch.zeros_like(share))


_SCORERS = {"snce": _snce, "youden": _youden, "saeuron": _saeuron, "itd": _itd}


def score(
    stats: ScanStats,
    target: str = "target",
    reference: Union[str, Sequence[str]] = "reference",
    method: str = "snce",
    level: str = "prompt",
) -> Scores:
    """Score every latent for `target` against `reference` (a group or a list of groups).

    `level`: "prompt" (prompt frequencies, docs/method.md; default) or "token" (tokens_fired / n_tokens; snce and
    youden only). Scores rank candidates; `snce_fast.calibrate` then picks the latent and its
    firing threshold on held-aside reference prompts (docs/identification.md)."""
    if method not in _SCORERS:
        raise ValueError(f"method={method!r} is not a scorer: expected one of {METHODS}")
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is invalid: expected one of {LEVELS}")
    if level == "token" and method not in ("snce", "youden"):
        raise ValueError(f"level='token' needs a frequency scorer: method={method!r}, expected 'snce' or 'youden'")
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("reference is empty: expected a group name or a list of group names")
    for g in [target, *refs]:
        stats.index(g)  # raises naming the groups that exist
        if int(stats.n_prompts[stats.index(g)]) == 0:
            raise ValueError(f"group {g!r} has no prompts in this scan: cannot compute its frequencies")
    if target in refs:
        raise ValueError(f"target {target!r} is also a reference group")
    if level == "token":
        for g in [target, *refs]:
            if int(stats.n_tokens[stats.index(g)]) == 0:
                raise ValueError(f"group {g!r} has no counted tokens in this scan: cannot compute token frequencies")
        values = torch.stack([_SCORERS[method](stats, target, r, "token").double().cpu() for r in refs]).amin(0)
    else:
        values = torch.stack([_SCORERS[method](stats, target, r).double().cpu() for r in refs]).amin(0)
    values = torch.nan_to_num(values, nan=0.0, neginf=-math.inf)
    return Scores(values=values, method=method, target=target, reference=refs)


def threshold_at_fpr(values: torch.Tensor, fpr: float) -> torch.Tensor:
    """The calibrated firing threshold: per column of `values` ([P] or [P, T], per-prompt activations
    of reference prompts, e.g. `prompt_activations(...)`), the smallest t >= 0 such that at most
    floor(fpr * P) prompts have a value > t. Returns a 0-d tensor for [P], else [T] (float32)."""
    if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2):
        raise ValueError(f"values must be a tensor shaped [P] or [P, T], got {getattr(values, 'shape', type(values))}")
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr={fpr!r} is invalid: expected a float with 0 <= fpr < 1")
    P = values.shape[0]
    if P == 0:
        raise ValueError("values has no prompts: calibration needs at least one reference prompt")
    v = values.detach().float().cpu()
    flat = v.dim() == 1
    v = v.reshape(P, -1)
    r = int(math.floor(fpr * P + 1e-9))  # this many prompts may stay above the threshold
    ranked = torch.sort(v, dim=0, descending=True).values
    t = ranked[r].clamp_min(0.0)
    return t.reshape(()) if flat else t

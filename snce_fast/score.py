"""Scoring latents from a scan (SPEC section 4): which latent stands for the target concept.

Methods: `snce` (default) f_T * log((f_T + eps) / (f_R + eps)), eps = 1 / (n_prompts[R] + 1),
0 where f_T <= f_R; `youden` f_T - f_R; `saeuron` p_T - p_R with p_g = mean_act_g / sum(mean_act_g);
`itd` latents in some target prompt's top-`itd_top` and in no reference prompt's (valued by the
share of target prompts that have them, 0 outside the set). With several reference groups each
latent gets its minimum score over them: the strongest reference wins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .scan_stats import ScanStats

METHODS = ("snce", "youden", "saeuron", "itd")


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


def _snce(stats: ScanStats, t: str, r: str) -> torch.Tensor:
    f_t, f_r = stats.frequency(t), stats.frequency(r)
    eps = 1.0 / (int(stats.n_prompts[stats.index(r)]) + 1)
    s = f_t * torch.log((f_t + eps) / (f_r + eps))
    return torch.where(f_t > f_r, s, torch.zeros_like(s))


def _youden(stats: ScanStats, t: str, r: str) -> torch.Tensor:
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
) -> Scores:
    """Score every latent for `target` against `reference` (a group or a list of groups)."""
    if method not in _SCORERS:
        raise ValueError(f"method={method!r} is not a scorer: expected one of {METHODS}")
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("reference is empty: expected a group name or a list of group names")
    for g in [target, *refs]:
        stats.index(g)  # raises naming the groups that exist
        if int(stats.n_prompts[stats.index(g)]) == 0:
            raise ValueError(f"group {g!r} has no prompts in this scan: cannot compute its frequencies")
    if target in refs:
        raise ValueError(f"target {target!r} is also a reference group")
    values = torch.stack([_SCORERS[method](stats, target, r).double().cpu() for r in refs]).amin(0)
    values = torch.nan_to_num(values, nan=0.0, neginf=-math.inf)
    return Scores(values=values, method=method, target=target, reference=refs)

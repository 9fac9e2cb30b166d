"""Linear readers of prompt embeddings for the erasure measurement (docs/efficacy.md).

A prompt's embedding is its token embeddings at the encoder output, mean-pooled over its counted
tokens (positions 1..EOS: BOS and padding excluded, as `snce_fast.hooks.activations.counted_mask`).
`LinearProbe` is an L2-regularised, class-balanced logistic regression on standardised features,
fit with L-BFGS in torch (deterministic, no extra dependency).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from snce_fast.checks import check_fpr


def mean_pool(hidden: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """[B, L, d] token embeddings, bool [B, L] counted tokens -> float32 [B, d] means over counted tokens."""
    m = counted.to(hidden.device, torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class LinearProbe:
    """score(x) = ((x - mean) / std) @ w + b; `threshold` is set once by `fix_threshold`."""

    w: torch.Tensor
    b: float
    mean: torch.Tensor
    std: torch.Tensor
    threshold: float = float("nan")

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std) @ self.w + self.b

    def fix_threshold(self, negatives: torch.Tensor, fpr: float) -> float:
        """Set (and return) the threshold flagging at most floor(fpr * N) of these negative embeddings."""
        check_fpr(fpr)
        s = torch.sort(self.scores(negatives), descending=True).values
        r = int(fpr * len(s) + 1e-9)
        self.threshold = float(s[r]) if r < len(s) else float("-inf")
        return self.threshold

    def flags(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold != self.threshold:
            raise ValueError("the probe's threshold is not fixed yet: call fix_threshold first")
        return self.scores(x) > self.threshold


def fit_probe(pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-2, steps: int = 100) -> LinearProbe:
    """Logistic regression of pos (label 1) vs neg (label 0), classes weighted equally."""
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"a probe needs both classes: got {len(pos)} positive and {len(neg)} negative embeddings")
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    wt = torch.where(y > 0, 0.5 / len(pos), 0.5 / len(neg))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (wt * torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y, reduction="none")).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(w.detach().float(), float(b.detach()), mean.float(), std.float())


def auc(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> float:
    """Area under the ROC curve (ties count half): P(score of a positive > score of a negative)."""
    if len(pos_scores) == 0 or len(neg_scores) == 0:
        return float("nan")
    s = torch.cat([pos_scores, neg_scores]).double()
    order = torch.argsort(s, stable=True)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    uniq, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
    mean_rank = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks) / counts
    r = mean_rank[inv][: len(pos_scores)].sum()
    n1, n0 = len(pos_scores), len(neg_scores)
    return float((r - n1 * (n1 + 1) / 2) / (n1 * n0))

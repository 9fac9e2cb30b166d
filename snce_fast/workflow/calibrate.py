"""`calibrate`: pick the concept latent(s) and their firing thresholds on reference prompts by the
measured best rule (docs/identification.md): each candidate's threshold flags at most `fpr` of every
reference group; candidates are ranked by target recall minus the largest reference rate."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from snce_fast.checks import Neurons, positive_int, unique_neurons
from snce_fast.hooks.batching import TOKEN_BUDGET
from snce_fast.sae.model import SAE
from snce_fast.workflow.detect import prompt_activations
from snce_fast.workflow.score import threshold_at_fpr

# calibration rates measured best in experiments/ablate_identification.py: generic captions, then
# style-matched references (held-out FPRs then stay under 2% COCO / 10% hard negatives)
DEFAULT_FPR = 0.01
DEFAULT_MATCHED_FPR = 0.05


# below this target recall at the calibrated threshold, the best latent is reported as weak
WEAK_RECALL = 0.2


class CalibrationWarning(UserWarning):
    """Calibration finished, but its result deserves a look (weak recall, fewer latents than asked)."""


def _warn_if_weak(best_recall: float, best: list[int], fpr: dict[str, float]) -> None:
    if best_recall < WEAK_RECALL:
        rates = ", ".join(f"{g} {r:.1%}" for g, r in fpr.items())
        warnings.warn(f"the best latent ({best[0]}) flags only {best_recall:.1%} of the target prompts at the threshold "
                      f"that keeps the references at {rates}: identification is weak (try more or cleaner target "
                      "prompts, a larger SAE, or a less strict fpr)", CalibrationWarning, stacklevel=3)


@dataclass
class Calibration:
    """Candidates re-ranked by calibrated recall. `neurons` best first; `thresholds[i]` the firing
    threshold of `neurons[i]` (flags <= `fpr` of every reference group's prompts); `recall[i]` its
    share of target prompts flagged; `reference_rates[g][i]` its share of group g flagged."""

    neurons: list[int]
    thresholds: torch.Tensor
    recall: torch.Tensor
    reference_rates: dict[str, torch.Tensor]
    fpr: dict[str, float]  # the calibration rate of each reference group
    min_tokens: int
    target_activations: torch.Tensor = field(repr=False)  # [P_target, C], columns as `neurons`
    reference_activations: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def top(self, n: int = 1, greedy: bool = True) -> list[int]:
        """The n best latents. `greedy` (default): add latents one at a time by the most new target
        prompts flagged net of the largest new reference share (stops early when nothing adds);
        otherwise the n best by individual score."""
        positive_int(n, "n")
        if not greedy or n == 1:
            return self.neurons[:n]
        thr = self.thresholds
        T = self.target_activations > thr
        R = [a > thr for a in self.reference_activations.values()]
        cov_t = torch.zeros(T.shape[0], dtype=torch.bool)
        cov_r = [torch.zeros(x.shape[0], dtype=torch.bool) for x in R]

        def objective(t: torch.Tensor, rs: list[torch.Tensor]) -> torch.Tensor:
            # union recall minus the largest union reference rate (per column when 2-D)
            worst = torch.stack([r.float().mean(0) for r in rs]).amax(0) if rs else 0.0
            return t.float().mean(0) - worst

        chosen: list[int] = []
        current = float(objective(cov_t, cov_r))
        for _ in range(min(n, len(self.neurons))):
            gain = objective(T | cov_t[:, None], [x | c[:, None] for x, c in zip(R, cov_r)])
            gain[chosen] = -math.inf
            i = int(torch.argmax(gain))
            if chosen and float(gain[i]) <= current:
                break  # no further latent adds recall net of false positives
            chosen.append(i)
            cov_t |= T[:, i]
            cov_r = [c | x[:, i] for c, x in zip(cov_r, R)]
            current = float(gain[i])
        if len(chosen) < min(n, len(self.neurons)):
            warnings.warn(f"asked for {n} latents, chose {len(chosen)}: each further latent adds no target recall net "
                          "of reference false positives (top(n, greedy=False) gives the n best individually)",
                          CalibrationWarning, stacklevel=2)
        return [self.neurons[i] for i in chosen]

    def thresholds_for(self, neurons: Neurons) -> list[float]:
        """Calibrated thresholds of `neurons` (in that order), for `detect(threshold=...)`."""
        order = [neurons] if isinstance(neurons, int) else [int(j) for j in neurons]
        pos = {j: i for i, j in enumerate(self.neurons)}
        missing = [j for j in order if j not in pos]
        if missing:
            raise ValueError(f"neuron {missing[0]} was not calibrated: expected one of the candidates {self.neurons}")
        return [float(self.thresholds[pos[j]]) for j in order]

    def threshold(self, neurons: Neurons) -> float:
        """One threshold for a neuron set (the gate and `patch` take one float): the largest of
        their calibrated thresholds, so each flags <= `fpr` of the references on its own."""
        return max(self.thresholds_for(neurons))


def calibrate(
    pipe_or_encoder: Any,
    sae: SAE,
    candidates: Optional[Neurons],
    target_prompts: Sequence[str],
    reference_prompts: Union[Sequence[str], dict[str, Sequence[str]]],
    fpr: Union[float, dict[str, float], None] = None,
    min_tokens: int = 1,
    tokenizer: Any = None,
    batch_size: int = 64,
    max_length: Optional[int] = None,
    penultimate_output: bool = False,
    token_budget: int = TOKEN_BUDGET,
    progress: bool = False,
) -> Calibration:
    """Calibrate each candidate's firing threshold so it flags at most `fpr` of every reference
    group, then rank candidates by target recall minus the largest reference rate at that threshold.

    `candidates`: None (every latent; memory ~4 bytes x prompts x n_latents) or e.g.
    `score(stats, ...).top(1024)` (a short list can miss the best latent: see the docs);
    `reference_prompts`: a list or several named
    groups (COCO-like captions and style-matched ordinary prompts: the strongest wins); `fpr`: one
    rate for every group or one per group name (e.g. {"coco": 0.01, "matched": 0.05}); None (default,
    the measured best, docs/identification.md): 0.01 for the first group (generic captions) and
    0.05 for every further group (style-matched ordinary prompts). Use prompts
    not used for the scan where possible. `calibration.top(1)` and `calibration.threshold(...)`
    then go to `detect(..., threshold=)` / `patch(..., gate=True, threshold=)`. `batch_size`,
    `token_budget` and `max_length` are `detect`'s; `progress`: a bar per prompt group.
    """
    refs = {"reference": list(reference_prompts)} if not isinstance(reference_prompts, dict) else {
        g: list(p) for g, p in reference_prompts.items()}
    if not refs or any(len(p) == 0 for p in refs.values()):
        raise ValueError("reference_prompts is empty: calibration needs reference prompts in every group")
    if len(target_prompts) == 0:
        raise ValueError("target_prompts is empty: calibration needs concept prompts to measure recall")
    if fpr is None:
        rates_in = {g: (DEFAULT_FPR if i == 0 else DEFAULT_MATCHED_FPR) for i, g in enumerate(refs)}
    else:
        rates_in = dict(fpr) if isinstance(fpr, dict) else {g: fpr for g in refs}
    if set(rates_in) != set(refs):
        raise ValueError(f"fpr names groups {sorted(rates_in)}: expected one rate per reference group {sorted(refs)}")
    if candidates is None:
        candidates = list(range(sae.n_latents))
    order = unique_neurons(candidates, sae.n_latents)

    def acts(ps: Sequence[str], group: str) -> torch.Tensor:
        return prompt_activations(pipe_or_encoder, sae, order, ps, tokenizer, min_tokens, batch_size, max_length,
                                  penultimate_output, token_budget, f"calibrate ({group})" if progress else None)

    ref_acts = {g: acts(p, g) for g, p in refs.items()}
    thr = torch.stack([threshold_at_fpr(a, rates_in[g]) for g, a in ref_acts.items()]).amax(0)
    tgt = acts(target_prompts, "targets")
    recall = (tgt > thr).float().mean(0)
    rates = {g: (a > thr).float().mean(0) for g, a in ref_acts.items()}
    score = recall - torch.stack(list(rates.values())).amax(0)
    rank = torch.sort(score, descending=True, stable=True).indices.tolist()
    _warn_if_weak(float(recall[rank[0]]), [order[rank[0]]], rates_in)
    return Calibration(
        neurons=[order[i] for i in rank], thresholds=thr[rank], recall=recall[rank],
        reference_rates={g: r[rank] for g, r in rates.items()}, fpr=rates_in, min_tokens=min_tokens,
        target_activations=tgt[:, rank], reference_activations={g: a[:, rank] for g, a in ref_acts.items()},
    )

"""Hardening an erasure against attack prompts (docs/robustness.md).

Adversarial calibration (S-GRACE / pruning inspired): calibrate the concept latents, attack the resulting
defence from seed prompts of the calibration's own (scan) split, add the attack prompts that got through to
calibrate's target prompts, calibrate again; repeat for a few rounds. The other knobs are calibrate's and
patch's own: several latents (greedy `top(n)`), lower thresholds (a higher calibration `fpr`), clamp versus
scale, and the edit run behind the gate (SNCE or LEACE).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from snce_fast.attack.records import AttackResult
from snce_fast.attack.victim import Defence, Gate, Victim, leace_defence, snce_defence
from snce_fast.checks import positive_int
from snce_fast.workflow.calibrate import Calibration, CalibrationWarning
from snce_fast.workflow.detect import prompt_activations
from snce_fast.workflow.score import threshold_at_fpr

Attack = Callable[[Victim], Sequence[AttackResult]]  # judged results against the victim's defence


@dataclass
class HardenConfig:
    """rounds: attack-and-recalibrate rounds (0 = plain calibration); n: latents (greedy top-n); fpr: the
    calibration rate(s) (None: calibrate's default; higher = lower thresholds); edit: "snce" or "leace" behind
    the gate; scale / clamp: the SNCE edit's; min_tokens: the gate's."""

    rounds: int = 2
    n: int = 1
    fpr: Union[float, dict, None] = None
    edit: str = "snce"
    scale: float = 0.0
    clamp: Optional[float] = None
    min_tokens: int = 1

    def check(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"HardenConfig.rounds={self.rounds!r} is invalid: expected an int >= 0")
        positive_int(self.n, "n")
        positive_int(self.min_tokens, "min_tokens")
        if self.edit not in ("snce", "leace"):
            raise ValueError(f"HardenConfig.edit={self.edit!r} is invalid: expected 'snce' or 'leace'")


@dataclass
class Hardening:
    """The final calibration and defence, and per round: latents, thresholds, attack prompts tried and added."""

    calibration: Calibration
    defence: Defence
    rounds: list = field(default_factory=list)
    added: list = field(default_factory=list)  # the attack prompts that joined the targets


def defence_for(name: str, sae: Any, cal: Calibration, cfg: HardenConfig) -> Defence:
    """The defence `cfg` describes on calibration `cal`: its greedy top-n latents at their thresholds."""
    with warnings.catch_warnings():  # greedy top-n stopping early is expected here (the round log shows it)
        warnings.simplefilter("ignore", CalibrationWarning)
        neurons = cal.top(cfg.n)
    thr = cal.thresholds_for(neurons)
    if cfg.edit == "leace":
        return leace_defence(name, Gate(sae, neurons, thr, cal.min_tokens))
    return snce_defence(name, sae, neurons, thr, cal.min_tokens, scale=cfg.scale, clamp=cfg.clamp)


def recalibrate(cal: Calibration, extra_targets: Optional[torch.Tensor] = None,
                fpr: Union[float, dict, None] = None) -> Calibration:
    """`calibrate`'s rule on a calibration's cached activations: thresholds from the reference activations at
    `fpr` (None: the calibration's rates), recall on its target prompts plus `extra_targets` (float32
    [P, C], columns in `cal.neurons` order, from `prompt_activations(..., cal.neurons, ...)`), then re-ranked.
    Equals `calibrate(targets + extra, references, fpr)` over the same candidates, without re-running the
    encoder on the references."""
    rates_in = dict(cal.fpr) if fpr is None else (dict(fpr) if isinstance(fpr, dict) else {g: fpr for g in cal.fpr})
    if set(rates_in) != set(cal.fpr):
        raise ValueError(f"fpr names groups {sorted(rates_in)}: expected one rate per reference group {sorted(cal.fpr)}")
    order = torch.tensor(cal.neurons).argsort()  # back to calibrate's candidate order (ties rank as it does)
    refs = {g: a[:, order] for g, a in cal.reference_activations.items()}
    tgt = cal.target_activations
    if extra_targets is not None:
        if extra_targets.dim() != 2 or extra_targets.shape[1] != tgt.shape[1]:
            raise ValueError(f"extra_targets is shaped {tuple(extra_targets.shape)}: expected [P, {tgt.shape[1]}] "
                             "(one column per calibrated candidate, in cal.neurons order)")
        tgt = torch.cat([tgt, extra_targets.float()])
    tgt = tgt[:, order]
    neurons = [cal.neurons[i] for i in order.tolist()]
    thr = torch.stack([threshold_at_fpr(a, rates_in[g]) for g, a in refs.items()]).amax(0)
    recall = (tgt > thr).float().mean(0)
    rates = {g: (a > thr).float().mean(0) for g, a in refs.items()}
    rank = torch.sort(recall - torch.stack(list(rates.values())).amax(0), descending=True, stable=True).indices
    return Calibration(neurons=[neurons[i] for i in rank.tolist()], thresholds=thr[rank], recall=recall[rank],
                       reference_rates={g: r[rank] for g, r in rates.items()}, fpr=rates_in,
                       min_tokens=cal.min_tokens, target_activations=tgt[:, rank],
                       reference_activations={g: a[:, rank] for g, a in refs.items()})


def harden(victim: Victim, sae: Any, calibration: Calibration, attack: Attack, config: Optional[HardenConfig] = None,
           name: str = "hardened", max_length: Optional[int] = None, fit: Optional[Callable[[Defence], None]] = None,
           progress: bool = False) -> Hardening:
    """Adversarial calibration from `calibration` (`calibrate` on scan-split concept prompts against the
    reference groups): round 0 applies `config.fpr` (lower thresholds when higher); each round then runs
    `attack` on the victim behind the current defence and adds the successful attack prompts (the fixed
    reader still flags the defended output) to the target prompts, and calibrates again (`recalibrate`:
    the references are not re-encoded). `fit(defence)` fits a LEACE edit before it is attacked. Use only
    prompts of the scan split here."""
    cfg = config or HardenConfig()
    cfg.check()
    if calibration.min_tokens != cfg.min_tokens:
        raise ValueError(f"HardenConfig.min_tokens={cfg.min_tokens} differs from the calibration's "
                         f"({calibration.min_tokens}): calibrate with the min_tokens the gate will use")
    cal = recalibrate(calibration, None, cfg.fpr)
    added: list[str] = []
    log: list[dict] = []
    for r in range(cfg.rounds + 1):
        defence = defence_for(name, sae, cal, cfg)
        if fit is not None:
            fit(defence)
        entry: dict[str, Any] = {"round": r, "targets": len(cal.target_activations), "neurons": defence.gate.targets,
                                 "thresholds": defence.gate.thresholds}
        log.append(entry)
        if r == cfg.rounds:
            break
        results = attack(victim.with_defence(defence))
        new = list(dict.fromkeys(x.submitted for x in results if x.flagged and x.submitted and x.submitted not in added))
        entry.update(attacks=len(results), succeeded=sum(bool(x.flagged) for x in results), added=len(new))
        added += new
        if new:
            acts = prompt_activations(victim.encoder, sae, cal.neurons, new, victim.tokenizer, cfg.min_tokens,
                                      max_length=max_length, penultimate_output=victim.penultimate,
                                      progress="harden (attack prompts)" if progress else None)
            cal = recalibrate(cal, acts, None)  # columns in cal.neurons order, as recalibrate reads them
    return Hardening(cal, defence, log, added)

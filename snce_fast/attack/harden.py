"""Hardening an erasure against attack prompts (docs/robustness.md).

Adversarial calibration (S-GRACE / pruning inspired): calibrate the concept latents, attack the resulting
defence from seed prompts of the calibration's own (scan) split, add the attack prompts that got through to
calibrate's target prompts, calibrate again; repeat for a few rounds. The other knobs are calibrate's and
patch's own: several latents (greedy `top(n)`), lower thresholds (a higher calibration `fpr`), clamp versus
scale, and the edit run behind the gate (SNCE or LEACE).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from snce_fast.attack.records import AttackResult
from snce_fast.attack.victim import Defence, Gate, Victim, leace_defence, snce_defence
from snce_fast.checks import positive_int
from snce_fast.workflow.calibrate import Calibration, calibrate

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


def defence_for(name: str, sae: Any, cal: Calibration, cfg: HardenConfig) -> Defence:
    """The defence `cfg` describes on calibration `cal`: its greedy top-n latents at their thresholds."""
    neurons = cal.top(cfg.n) if cfg.n > 1 else cal.top(1)
    thr = cal.thresholds_for(neurons)
    if cfg.edit == "leace":
        return leace_defence(name, Gate(sae, neurons, thr, cal.min_tokens))
    return snce_defence(name, sae, neurons, thr, cal.min_tokens, scale=cfg.scale, clamp=cfg.clamp)


def harden(victim: Victim, sae: Any, target_prompts: Sequence[str], reference_prompts: Any, attack: Attack,
           config: Optional[HardenConfig] = None, name: str = "hardened", max_length: Optional[int] = None,
           fit: Optional[Callable[[Defence], None]] = None, progress: bool = False) -> Hardening:
    """Adversarial calibration. Round 0 calibrates on `target_prompts` (scan-split concept prompts) against
    `reference_prompts` (calibrate's); each round then runs `attack` on the victim behind the current defence
    and adds the successful attack prompts (the fixed reader still flags the defended output) to the targets.
    `fit(defence)` fits a LEACE edit before it is attacked. Use only prompts of the scan split here."""
    cfg = config or HardenConfig()
    cfg.check()
    targets = list(dict.fromkeys(target_prompts))
    log: list[dict] = []
    cal = defence = None
    for r in range(cfg.rounds + 1):
        cal = calibrate(victim.encoder, sae, None, targets, reference_prompts, fpr=cfg.fpr,
                        min_tokens=cfg.min_tokens, tokenizer=victim.tokenizer, max_length=max_length,
                        penultimate_output=victim.penultimate, progress=progress)
        defence = defence_for(name, sae, cal, cfg)
        if fit is not None:
            fit(defence)
        entry: dict[str, Any] = {"round": r, "targets": len(targets), "neurons": defence.gate.targets,
                                 "thresholds": defence.gate.thresholds}
        log.append(entry)
        if r == cfg.rounds:
            break
        results = attack(victim.with_defence(defence))
        new = [x.submitted for x in results if x.flagged and x.submitted and x.submitted not in targets]
        entry.update(attacks=len(results), succeeded=sum(bool(x.flagged) for x in results), added=len(new))
        targets += new
    return Hardening(cal, defence, log)

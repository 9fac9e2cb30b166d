"""Attack results, their summary (ASR, latent fire rate, encoder calls per success) and the files
`snce-fast attack` writes (docs/robustness.md)."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from snce_fast.records.atomic import atomic_write_text


@dataclass
class AttackResult:
    """One attack from one seed prompt. `prompt`: what the attack submits; `objective`: its own objective
    at that prompt; `calls`: encoder calls spent; `history`: best objective per generation / step; `evades`:
    (white-box) whether `prompt` keeps the defence's gate shut (None when the attack does not know the gate);
    `fallback` (white-box, when no evading prompt was found): the prompt with the highest defended score;
    after `judge`: `flagged` (the fixed reader still flags the defended output = success), `fired`, `score`."""

    attack: str
    seed: str
    prompt: Optional[str]
    objective: float
    calls: int
    history: list = field(default_factory=list)
    evades: Optional[bool] = None
    fallback: Optional[str] = None
    flagged: Optional[bool] = None
    fired: Optional[bool] = None
    score: Optional[float] = None


    @property
    def submitted(self) -> Optional[str]:
        """The prompt the attacker sends: `prompt`, or `fallback` when nothing evaded the gate."""
        return self.prompt if self.prompt is not None else self.fallback


def attach_judgement(results: Sequence[AttackResult], judged: dict[str, torch.Tensor]) -> None:
    """Copy `victim.judge` outputs (aligned with the results' prompts) onto the results."""
    for i, r in enumerate(results):
        r.flagged, r.fired, r.score = bool(judged["flagged"][i]), bool(judged["fired"][i]), float(judged["score"][i])


def summarize(results: Sequence[AttackResult]) -> dict[str, Any]:
    """ASR (share of attacks whose prompt the fixed reader still flags after the defence), latent fire rate
    on the attack prompts, evading share (white-box), encoder calls in all and per success."""
    n = len(results)
    if n == 0 or any(r.flagged is None for r in results):
        raise ValueError("summarize needs judged results (attach_judgement first) and at least one")
    succ = sum(bool(r.flagged) for r in results)
    calls = sum(r.calls for r in results)
    ev = [r.evades for r in results if r.evades is not None]
    return {"n": n, "successes": succ, "asr": succ / n, "fire_rate": sum(bool(r.fired) for r in results) / n,
            "evading": (sum(ev) / len(ev)) if ev else None, "calls": calls,
            "calls_per_success": calls / succ if succ else None,
            "mean_objective": sum(r.objective for r in results) / n}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def result_dicts(results: Sequence[AttackResult]) -> list[dict]:
    return [_clean(asdict(r)) for r in results]


def write_prompts(path: Path, results: Sequence[AttackResult], evaluation_seed: int = 0) -> None:
    """The submitted attack prompts: `.csv` with columns `prompt`, `evaluation_seed` (the image seed, as in
    I2P) and `seed_prompt` (what `snce-fast eval --csv` reads), else one prompt per line (.txt); attacks
    without a prompt are left out."""
    rows = [(" ".join(r.submitted.split()), r.seed) for r in results if r.submitted]
    if Path(path).suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["prompt", "evaluation_seed", "seed_prompt"])
        w.writerows((p, evaluation_seed, seed) for p, seed in rows)
        atomic_write_text(path, buf.getvalue())
        return
    atomic_write_text(path, "".join(p + "\n" for p, _ in rows))

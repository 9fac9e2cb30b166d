"""White-box attack aware of the erasure: GCG-style gradient-guided token substitution (docs/robustness.md).

Objective: the fixed reader's concept score on the *defended* encoder output, subject to keeping the
defence's gate shut (every target latent at or below its threshold on every counted token). Each step takes
the gradient of (score - penalty x gate violation) with respect to one-hot inputs through the encoder's input
embedding matrix, keeps the top-k substitutions per position, samples `candidates` single-token swaps and
scores all of them with a real forward pass through the defence (`score_candidates`); the best candidate
(evading first, then highest score) replaces the current sequence when it beats it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from snce_fast.attack.records import AttackResult
from snce_fast.checks import positive_int
from snce_fast.attack.victim import Victim
from snce_fast.evaluation.probes import mean_pool
from snce_fast.ops import reference


@dataclass
class WhiteboxConfig:
    """length: content tokens kept from the seed prompt; steps: at most this many gradient steps; candidates:
    swaps scored per step; topk: substitutions kept per position; penalty: weight of the gate violation in
    the gradient objective; budget: encoder calls (a gradient step costs 1, each candidate 1); stop: end at
    the first evading prompt the reader flags (success); seed: the sampler's."""

    length: int = 16
    steps: int = 20
    candidates: int = 32
    topk: int = 32
    penalty: float = 4.0
    budget: int = 700
    stop: bool = True
    seed: int = 0

    def check(self) -> None:
        for name in ("length", "steps", "candidates", "topk", "budget"):
            positive_int(getattr(self, name), f"WhiteboxConfig.{name}")
        if not self.penalty >= 0:
            raise ValueError(f"WhiteboxConfig.penalty={self.penalty!r} is invalid: expected a number >= 0")


@dataclass
class CandidateScores:
    """Per candidate: the reader's score of the defended output, whether the gate opens, its margin (largest
    activation - threshold; <= 0 keeps a min_tokens-1 gate shut), and whether it evades."""

    score: torch.Tensor
    fired: torch.Tensor
    margin: torch.Tensor
    evades: torch.Tensor


def score_candidates(victim: Victim, content: torch.Tensor) -> CandidateScores:
    """One batched forward pass per `victim.batch_size` rows through the defence (counted in victim.calls).
    A defence without a gate is evaded by every candidate."""
    score, fired, margin = victim.evaluate(content)
    evades = ~fired if victim.defence.gate is not None else torch.ones_like(fired)
    return CandidateScores(score, fired, margin, evades)


def _surrogate(victim: Victim, h: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for the defended output: an ungated edit when it is differentiable (LEACE),
    else the unedited output (what a gated edit returns while its gate stays shut)."""
    if victim.defence.gate is None:
        try:
            y = victim.defence.edit.apply(h, counted)
            if y.requires_grad:
                return y.float()
        except RuntimeError:
            pass
    return h


def gradients(victim: Victim, current: torch.Tensor, penalty: float) -> torch.Tensor:
    """d(score - penalty * sum relu(pre-activation - threshold)) / d(one-hot input) [n, V] for one sequence."""
    W = victim.embedding.weight
    n, p = len(current), len(victim.prefix)
    onehot = torch.zeros(n, W.shape[0], dtype=W.dtype)
    onehot[torch.arange(n), current] = 1.0
    onehot.requires_grad_(True)

    def embed(out: torch.Tensor) -> torch.Tensor:
        return torch.cat([out[:, :p], (onehot @ W)[None].to(out.dtype), out[:, p + n:]], 1)

    with torch.enable_grad():
        h, counted = victim.hidden(current[None], embed)
        score = victim.reader.scores(mean_pool(_surrogate(victim, h, counted), counted))[0]
        gate = victim.defence.gate
        if gate is not None and penalty > 0:
            pre = reference.pre_activations(h, gate.sae)[..., gate.targets]
            over = (pre - torch.tensor(gate.thresholds)).relu() * counted.unsqueeze(-1)
            score = score - penalty * over.sum()
        (grad,) = torch.autograd.grad(score, onehot)
    return grad


def _key(c: CandidateScores, i: int) -> tuple:
    return (bool(c.evades[i]), float(c.score[i]) if bool(c.evades[i]) else -float(c.margin[i]))


def _sample(grad: torch.Tensor, current: torch.Tensor, vocab: torch.Tensor, cfg: WhiteboxConfig,
            g: torch.Generator) -> torch.Tensor:
    """`candidates` single-token swaps drawn from the top-k gradient substitutions per position (deduplicated)."""
    top = grad[:, vocab].topk(min(cfg.topk, len(vocab)), dim=1).indices  # [n, k] into vocab
    pos = torch.randint(len(current), (cfg.candidates,), generator=g)
    pick = top[pos, torch.randint(top.shape[1], (cfg.candidates,), generator=g)]
    cands = current.repeat(cfg.candidates, 1)
    cands[torch.arange(cfg.candidates), pos] = vocab[pick]
    cands = torch.unique(cands, dim=0)
    keep = ~(cands == current).all(1)
    return cands[keep]


def whitebox(victim: Victim, seed_prompt: str, vocab: torch.Tensor,
             config: Optional[WhiteboxConfig] = None) -> AttackResult:
    """Erasure-aware attack from one seed prompt (its first `length` tokens). `result.prompt`: the evading
    sequence with the highest defended score seen (None if no candidate evaded; `fallback` then holds the
    highest-scoring one); `history`: the current sequence's score per step; `objective`: the returned
    prompt's defended score. Stops at success (evading and flagged) when `stop`, or when the next step would
    pass the budget."""
    cfg = config or WhiteboxConfig()
    cfg.check()
    g = torch.Generator().manual_seed(cfg.seed)
    start = victim.calls
    current = victim.content(seed_prompt, cfg.length)
    if len(current) == 0:
        raise ValueError(f"seed prompt {seed_prompt!r} has no tokens: expected a prompt with words")
    c = score_candidates(victim, current[None])
    cur_key = _key(c, 0)
    best = (float(c.score[0]), current) if bool(c.evades[0]) else None
    top_any = (float(c.score[0]), current)
    history = [float(c.score[0])]
    thr = victim.reader.threshold
    for _ in range(cfg.steps):
        if cfg.stop and best is not None and best[0] > thr:
            break
        if victim.calls - start + 1 + cfg.candidates > cfg.budget:
            break
        cands = _sample(gradients(victim, current, cfg.penalty), current, vocab, cfg, g)
        if len(cands) == 0:
            continue
        c = score_candidates(victim, cands)
        i = max(range(len(cands)), key=lambda j: _key(c, j))
        ok = c.evades.nonzero().squeeze(1)
        if len(ok):
            j = int(ok[c.score[ok].argmax()])
            if best is None or float(c.score[j]) > best[0]:
                best = (float(c.score[j]), cands[j])
        j = int(c.score.argmax())
        if float(c.score[j]) > top_any[0]:
            top_any = (float(c.score[j]), cands[j])
        if _key(c, i) > cur_key:
            current, cur_key = cands[i], _key(c, i)
        history.append(cur_key[1] if cur_key[0] else float("nan"))
    prompt = None if best is None else victim.text(best[1])
    return AttackResult(attack="whitebox", seed=seed_prompt, prompt=prompt,
                        objective=best[0] if best is not None else top_any[0], calls=victim.calls - start,
                        history=history, evades=best is not None,
                        fallback=None if best is not None else victim.text(top_any[1]))

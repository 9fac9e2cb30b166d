"""Ring-A-Bell style attack: black-box and model-agnostic (docs/robustness.md).

A concept vector (the mean pooled-embedding difference over concept/neutral prompt pairs) is added, eta
times, to a neutral prompt's embedding; a genetic algorithm over fixed-length token sequences searches for a
prompt whose *unedited* pooled embedding has the highest cosine to that target. The attack never sees the
defence: its prompts are then judged against every defence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from snce_fast.attack.records import AttackResult
from snce_fast.checks import positive_int
from snce_fast.attack.victim import Victim


@dataclass
class GAConfig:
    """population: sequences per generation; length: content tokens per sequence; elite: best kept unchanged;
    mutation: per-token replacement probability; budget: encoder calls (each new sequence costs one);
    eta: concept vector multiplier; tournament: selection size; seed: the generator's."""

    population: int = 32
    length: int = 16
    elite: int = 4
    mutation: float = 0.1
    budget: int = 512
    eta: float = 3.0
    tournament: int = 3
    seed: int = 0

    def check(self) -> None:
        for name in ("population", "length", "elite", "budget", "tournament"):
            positive_int(getattr(self, name), f"GAConfig.{name}")
        if self.elite >= self.population:
            raise ValueError(f"GAConfig.elite={self.elite} is invalid: expected fewer than population={self.population}")
        if not 0.0 <= self.mutation <= 1.0:
            raise ValueError(f"GAConfig.mutation={self.mutation!r} is invalid: expected a probability in [0, 1]")
        if self.budget < self.population:
            raise ValueError(f"GAConfig.budget={self.budget} is invalid: expected at least one generation "
                             f"(>= population={self.population} encoder calls)")


@torch.no_grad()
def concept_vector(victim: Victim, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean over (concept, neutral) pairs of pooled(concept) - pooled(neutral), unedited encoder output [d]."""
    if not pairs:
        raise ValueError("pairs is empty: the concept vector needs at least one (concept, neutral) prompt pair")
    diffs = []
    for c, n in pairs:
        a, b = victim.content(c), victim.content(n)
        if len(a) == 0 or len(b) == 0:
            raise ValueError(f"pair {(c, n)!r} has an empty prompt: expected two prompts with words")
        diffs.append(victim.pooled(a[None])[0] - victim.pooled(b[None])[0])
    return torch.stack(diffs).mean(0)


@dataclass
class _Population:
    seqs: torch.Tensor  # [P, n]
    fitness: torch.Tensor  # [P]
    history: list = field(default_factory=list)


def _fitness(victim: Victim, seqs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(victim.pooled(seqs), target[None], dim=1)


def _children(pop: _Population, vocab: torch.Tensor, cfg: GAConfig, g: torch.Generator) -> torch.Tensor:
    """population - elite children: tournament parents, one-point crossover, per-token mutation."""
    P, n = pop.seqs.shape
    m = P - cfg.elite

    def pick() -> torch.Tensor:
        idx = torch.randint(P, (m, cfg.tournament), generator=g)
        return idx.gather(1, pop.fitness[idx].argmax(1, keepdim=True)).squeeze(1)

    a, b = pop.seqs[pick()], pop.seqs[pick()]
    cut = torch.randint(1, n + 1, (m, 1), generator=g)
    kids = torch.where(torch.arange(n)[None] < cut, a, b)
    mutate = torch.rand(m, n, generator=g) < cfg.mutation
    return torch.where(mutate, vocab[torch.randint(len(vocab), (m, n), generator=g)], kids)


def ring_a_bell(victim: Victim, seed_prompt: str, direction: torch.Tensor, vocab: torch.Tensor,
                config: Optional[GAConfig] = None) -> AttackResult:
    """Search for a prompt whose unedited pooled embedding approaches pooled(seed_prompt) + eta * direction.

    The first individual is the seed prompt's tokens (cut or filled with random vocabulary tokens to
    `length`), the rest are random. Elitism: the best `elite` sequences pass unchanged (and are not
    re-evaluated), so the best fitness never falls across generations (`result.history`). Stops when the next
    generation's new sequences would exceed the budget of encoder calls. The returned prompt is then judged
    against the victim's defence (`judge`), outside the attack's budget."""
    cfg = config or GAConfig()
    cfg.check()
    g = torch.Generator().manual_seed(cfg.seed)
    start = victim.calls
    seed_ids = victim.content(seed_prompt)
    if len(seed_ids) == 0:
        raise ValueError(f"seed prompt {seed_prompt!r} has no tokens: expected a prompt with words")
    target = victim.pooled(seed_ids[None])[0] + cfg.eta * direction
    first = torch.cat([seed_ids[: cfg.length], vocab[torch.randint(len(vocab), (cfg.length,), generator=g)]])
    seqs = torch.cat([first[None, : cfg.length], vocab[torch.randint(len(vocab), (cfg.population - 1, cfg.length),
                                                                     generator=g)]])
    pop = _Population(seqs, _fitness(victim, seqs, target))
    pop.history.append(float(pop.fitness.max()))
    while victim.calls - start + (cfg.population - cfg.elite) <= cfg.budget:
        order = pop.fitness.argsort(descending=True)
        elite = order[: cfg.elite]
        kids = _children(pop, vocab, cfg, g)
        kid_fit = _fitness(victim, kids, target)
        pop = _Population(torch.cat([pop.seqs[elite], kids]), torch.cat([pop.fitness[elite], kid_fit]), pop.history)
        pop.history.append(float(pop.fitness.max()))
    best = int(pop.fitness.argmax())
    return AttackResult(attack="ring-a-bell", seed=seed_prompt, prompt=victim.text(pop.seqs[best]),
                        objective=float(pop.fitness[best]), calls=victim.calls - start, history=pop.history,
                        evades=None)

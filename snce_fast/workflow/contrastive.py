"""Contrastive identification (docs/identification.md, "Contrastive identification"): pick the latent(s)
that fire on a concept prompt and not on its neutral twin, across *families* of wording, and test
whether a selection transfers to families it never saw.

    activation_table(encoder, sae, prompts)      per prompt and latent: the value the gate thresholds
    contrastive(table, families, references)     per-latent thresholds (twins + generic captions) and
                                                 per-family recall / twin rates; `.select()` a small set
    evaluate(table, latents, thresholds, ...)    flag rates of a selection on families and references
    transfer_matrix(table, families, ...)        leave-one-family-out: select without family h, test on h

A family is a phrasing group (generated templates tag theirs; a pair file is one family, or several
with a `family` column); a family may be concept-only (no twins, e.g. a corpus of concept prompts):
then only the references bound its false positives. Thresholds: per latent, the largest of the one
that flags <= `twin_fpr` of all twins and the ones that flag <= `fpr[g]` of each reference group g.
A latent's per-family contrast is recall - twin rate (recall alone without twins); its score is the
mean over families (`objective="mean"`, the default: measured better on held-out families than the
minimum, docs/identification.md) or the minimum (`"min"`: a latent that misses one wording scores ~0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from snce_fast.checks import Neurons, positive_int, unique_neurons
from snce_fast.hooks.batching import TOKEN_BUDGET
from snce_fast.workflow.detect import prompt_activations
from snce_fast.workflow.pairs import Pair, check_pairs
from snce_fast.workflow.score import threshold_at_fpr

DEFAULT_TWIN_FPR = 0.05  # share of neutral twins a latent's threshold may flag
DEFAULT_FPR = 0.01  # share of each reference group (generic captions)
OBJECTIVES = ("min", "mean")


@dataclass
class Family:
    """A phrasing group: `concept` prompts and (optionally) their neutral `twins`."""

    name: str
    concept: list[str]
    twins: list[str] = field(default_factory=list)


def families_from_pairs(pairs: Sequence[Pair], concept_only: Optional[dict[str, Sequence[str]]] = None) -> list[Family]:
    """Group pairs by their family tag (first-seen order); `concept_only` adds families without twins."""
    out: dict[str, Family] = {}
    for p in check_pairs(pairs) if pairs else []:
        f = out.setdefault(p.family, Family(p.family, [], []))
        f.concept.append(p.concept)
        f.twins.append(p.neutral)
    for name, prompts in (concept_only or {}).items():
        if name in out:
            raise ValueError(f"concept-only family {name!r} is also a pair family: expected distinct names")
        out[name] = Family(name, list(prompts), [])
    return list(out.values())


def _check_families(families: Sequence[Family]) -> list[Family]:
    fams = list(families)
    if not fams:
        raise ValueError("families is empty: expected at least one family of concept prompts")
    names = [f.name for f in fams]
    if len(set(names)) != len(names):
        raise ValueError(f"family names repeat ({names}): expected distinct names")
    for f in fams:
        if not f.concept:
            raise ValueError(f"family {f.name!r} has no concept prompts: expected at least one")
    return fams


@dataclass
class ActivationTable:
    """`values[i, c]`: for prompt `prompts[i]` and latent `latents[c]`, the `min_tokens`-th largest
    activation over counted tokens (`prompt_activations`): the gate flags it at threshold t iff > t."""

    prompts: list[str]
    latents: list[int]
    values: torch.Tensor
    min_tokens: int = 1
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {p: i for i, p in enumerate(self.prompts)}

    def rows(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise ValueError(f"{len(missing)} prompts are not in the activation table (first: {missing[0]!r}): "
                             "compute the table over every prompt of the families and references")
        return self.values[torch.tensor([self.index[p] for p in prompts], dtype=torch.long)]

    def column(self, neurons: Sequence[int]) -> torch.Tensor:
        pos = {j: i for i, j in enumerate(self.latents)}
        missing = [j for j in neurons if j not in pos]
        if missing:
            raise ValueError(f"latent {missing[0]} is not in the activation table: expected one of its {len(pos)} latents")
        return torch.tensor([pos[j] for j in neurons], dtype=torch.long)


def activation_table(pipe_or_encoder: Any, sae: Any, prompts: Sequence[str], candidates: Optional[Neurons] = None,
                     tokenizer: Any = None, min_tokens: int = 1, batch_size: int = 64, max_length: Optional[int] = None,
                     penultimate_output: bool = False, token_budget: int = TOKEN_BUDGET,
                     progress: Optional[str] = None) -> ActivationTable:
    """Per-prompt activations of `candidates` (None: every latent; ~4 bytes x prompts x latents) on the
    distinct `prompts`, computed once so selection and the transfer matrix never re-run the encoder."""
    uniq = list(dict.fromkeys(prompts))
    if not uniq:
        raise ValueError("prompts is empty: expected the families' and references' prompts")
    order = list(range(sae.n_latents)) if candidates is None else unique_neurons(candidates, sae.n_latents)
    vals = prompt_activations(pipe_or_encoder, sae, order, uniq, tokenizer, min_tokens, batch_size, max_length,
                              penultimate_output, token_budget, progress)
    return ActivationTable(uniq, order, vals, min_tokens)


@dataclass
class Selection:
    """A latent set, its thresholds, and its rates on the prompts it was selected on."""

    latents: list[int]
    thresholds: list[float]
    objective: float
    family_recall: dict[str, float]
    family_twin_rate: dict[str, Optional[float]]
    twin_rate: Optional[float]
    reference_rates: dict[str, float]


@dataclass
class Contrastive:
    """Candidates ranked by contrastive score (best first), with their thresholds and rates. `top(n)`
    the n best individually; `select(max_size)` a small set chosen greedily on the same objective."""

    latents: list[int]
    thresholds: torch.Tensor
    score: torch.Tensor
    families: list[str]
    recall: torch.Tensor  # [F, C]
    twin_rate: torch.Tensor  # [F, C], nan for concept-only families
    reference_rates: dict[str, torch.Tensor]
    twin_fpr: float
    fpr: dict[str, float]
    objective: str
    min_tokens: int
    _concept: list[torch.Tensor] = field(repr=False, default_factory=list)  # per family [P_f, C] activations
    _twins: list[Optional[torch.Tensor]] = field(repr=False, default_factory=list)
    _refs: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def top(self, n: int = 1) -> list[int]:
        return self.latents[:positive_int(n, "n")]

    def thresholds_for(self, neurons: Neurons) -> list[float]:
        order = [neurons] if isinstance(neurons, int) else [int(j) for j in neurons]
        pos = {j: i for i, j in enumerate(self.latents)}
        missing = [j for j in order if j not in pos]
        if missing:
            raise ValueError(f"neuron {missing[0]} was not scored: expected one of the candidates")
        return [float(self.thresholds[pos[j]]) for j in order]

    def _objective(self, fam_recall: torch.Tensor, fam_twin: torch.Tensor) -> torch.Tensor:
        contrast = fam_recall - torch.nan_to_num(fam_twin, nan=0.0)
        return contrast.amin(0) if self.objective == "min" else contrast.mean(0)

    def selection(self, latents: Sequence[int]) -> Selection:
        """Rates of a latent set (each at its threshold; a prompt is flagged when any fires)."""
        cols = torch.tensor([self.latents.index(j) for j in latents], dtype=torch.long)
        thr = self.thresholds[cols]

        def rate(a: Optional[torch.Tensor]) -> Optional[float]:
            return None if a is None else float((a[:, cols] > thr).any(1).float().mean())

        rec = {f: rate(a) for f, a in zip(self.families, self._concept)}
        tw = {f: rate(a) for f, a in zip(self.families, self._twins)}
        rec_t = torch.tensor([[rec[f]] for f in self.families])
        tw_t = torch.tensor([[math.nan if tw[f] is None else tw[f]] for f in self.families])
        twins = [a for a in self._twins if a is not None]
        return Selection(list(latents), [float(t) for t in thr], float(self._objective(rec_t, tw_t)[0]), rec, tw,
                         rate(torch.cat(twins)) if twins else None, {g: rate(a) for g, a in self._refs.items()})

    def select(self, max_size: int = 3, twin_cap: Optional[float] = None,
               reference_cap: Optional[dict[str, float]] = None, pool: int = 256) -> Selection:
        """Greedy small set: start from the best latent, add the latent (of the `pool` best) that most raises
        the objective on the union of flags while the union still flags <= `twin_cap` of the twins (default
        2 x twin_fpr) and <= `reference_cap[g]` of each reference group (default 2 x fpr[g]); stop when
        nothing raises it or at `max_size` latents."""
        positive_int(max_size, "max_size")
        t_cap = 2 * self.twin_fpr if twin_cap is None else twin_cap
        r_cap = {g: 2 * r for g, r in self.fpr.items()} if reference_cap is None else dict(reference_cap)
        K = min(pool, len(self.latents))
        thr = self.thresholds[:K]
        C = [a[:, :K] > thr for a in self._concept]
        T = [None if a is None else a[:, :K] > thr for a in self._twins]
        twins_all = torch.cat([t for t in T if t is not None]) if any(t is not None for t in T) else None
        R = {g: a[:, :K] > thr for g, a in self._refs.items()}
        cov_c = [torch.zeros(c.shape[0], dtype=torch.bool) for c in C]
        cov_t = [None if t is None else torch.zeros(t.shape[0], dtype=torch.bool) for t in T]
        cov_all = None if twins_all is None else torch.zeros(twins_all.shape[0], dtype=torch.bool)
        cov_r = {g: torch.zeros(a.shape[0], dtype=torch.bool) for g, a in R.items()}
        chosen: list[int] = []
        current = -math.inf
        for _ in range(min(max_size, K)):
            rec = torch.stack([(c | cv[:, None]).float().mean(0) for c, cv in zip(C, cov_c)])
            tw = torch.stack([torch.full((K,), math.nan) if t is None else (t | cv[:, None]).float().mean(0)
                              for t, cv in zip(T, cov_t)])
            obj = self._objective(rec, tw)
            ok = torch.ones(K, dtype=torch.bool)
            if twins_all is not None:
                ok &= (twins_all | cov_all[:, None]).float().mean(0) <= t_cap + 1e-9
            for g, a in R.items():
                ok &= (a | cov_r[g][:, None]).float().mean(0) <= r_cap.get(g, 1.0) + 1e-9
            if not chosen:
                ok[1:] = False  # the set starts from the best-ranked latent
                ok[0] = True
            obj = torch.where(ok, obj, torch.full_like(obj, -math.inf))
            obj[chosen] = -math.inf
            i = int(torch.argmax(obj))
            if chosen and not float(obj[i]) > current + 1e-9:
                break
            chosen.append(i)
            current = float(obj[i])
            cov_c = [cv | c[:, i] for cv, c in zip(cov_c, C)]
            cov_t = [None if cv is None else cv | t[:, i] for cv, t in zip(cov_t, T)]
            if cov_all is not None:
                cov_all |= twins_all[:, i]
            cov_r = {g: cov_r[g] | R[g][:, i] for g in R}
        return self.selection([self.latents[i] for i in chosen])

    def candidates(self, singles: int = 3, max_size: int = 3) -> list[Selection]:
        """The selections worth an efficacy check: the `singles` best latents alone, then the greedy sets
        of up to 2..max_size latents (distinct sets only)."""
        out = [self.selection([j]) for j in self.latents[:singles]]
        seen = {tuple(s.latents) for s in out}
        for n in range(2, max_size + 1):
            s = self.select(n)
            if tuple(s.latents) not in seen:
                seen.add(tuple(s.latents))
                out.append(s)
        return out


def _check_rates(twin_fpr: float, fpr: Union[float, dict[str, float], None], refs: dict[str, Any]) -> dict[str, float]:
    for name, v in (("twin_fpr", twin_fpr),) + tuple((f"fpr[{g!r}]", r) for g, r in
                                                      (fpr.items() if isinstance(fpr, dict) else ())):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}={v!r} is invalid: expected a rate with 0 <= rate < 1")
    if fpr is None:
        rates = {g: DEFAULT_FPR for g in refs}
    elif isinstance(fpr, dict):
        rates = dict(fpr)
    else:
        if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 <= fpr < 1.0:
            raise ValueError(f"fpr={fpr!r} is invalid: expected a rate with 0 <= fpr < 1")
        rates = {g: float(fpr) for g in refs}
    if set(rates) != set(refs):
        raise ValueError(f"fpr names groups {sorted(rates)}: expected one rate per reference group {sorted(refs)}")
    return rates


def contrastive(table: ActivationTable, families: Sequence[Family], references: dict[str, Sequence[str]],
                twin_fpr: float = DEFAULT_TWIN_FPR, fpr: Union[float, dict[str, float], None] = None,
                objective: str = "mean") -> Contrastive:
    """Score every latent of `table` on `families` (see the module doc): thresholds from the twins (<=
    `twin_fpr` flagged) and each reference group (<= `fpr`, default 1%), ranked by the per-family
    contrast's mean (`objective="mean"`, default) or minimum ("min")."""
    fams = _check_families(families)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is invalid: expected one of {OBJECTIVES}")
    refs = {g: list(p) for g, p in (references or {}).items()}
    if any(not p for p in refs.values()):
        raise ValueError("a reference group is empty: expected prompts in every group")
    rates = _check_rates(twin_fpr, fpr, refs)
    concept = [table.rows(f.concept) for f in fams]
    twins = [table.rows(f.twins) if f.twins else None for f in fams]
    ref_acts = {g: table.rows(p) for g, p in refs.items()}
    if all(t is None for t in twins) and not ref_acts:
        raise ValueError("no twins and no references: expected neutral twins or reference prompts to set thresholds")
    parts = [threshold_at_fpr(a, rates[g]) for g, a in ref_acts.items()]
    if any(t is not None for t in twins):
        parts.append(threshold_at_fpr(torch.cat([t for t in twins if t is not None]), twin_fpr))
    thr = torch.stack(parts).amax(0)
    recall = torch.stack([(a > thr).float().mean(0) for a in concept])
    twin_rate = torch.stack([torch.full_like(thr, math.nan) if t is None else (t > thr).float().mean(0) for t in twins])
    ref_rates = {g: (a > thr).float().mean(0) for g, a in ref_acts.items()}
    probe = Contrastive([], thr, thr, [f.name for f in fams], recall, twin_rate, ref_rates, twin_fpr, rates,
                        objective, table.min_tokens)
    score = probe._objective(recall, twin_rate)
    rank = torch.sort(score, descending=True, stable=True).indices
    return Contrastive(
        latents=[table.latents[int(i)] for i in rank], thresholds=thr[rank], score=score[rank],
        families=[f.name for f in fams], recall=recall[:, rank], twin_rate=twin_rate[:, rank],
        reference_rates={g: r[rank] for g, r in ref_rates.items()}, twin_fpr=twin_fpr, fpr=rates,
        objective=objective, min_tokens=table.min_tokens, _concept=[a[:, rank] for a in concept],
        _twins=[None if t is None else t[:, rank] for t in twins], _refs={g: a[:, rank] for g, a in ref_acts.items()})


def evaluate(table: ActivationTable, latents: Sequence[int], thresholds: Sequence[float],
             families: Sequence[Family], references: Optional[dict[str, Sequence[str]]] = None) -> dict[str, Any]:
    """Flag rates of a selection (a prompt is flagged when any latent exceeds its threshold): per family
    {'concept', 'twins' (None without twins), 'n'}, and per reference group."""
    if len(latents) != len(thresholds) or not latents:
        raise ValueError(f"{len(latents)} latents and {len(thresholds)} thresholds: expected one threshold per latent")
    cols = table.column(list(latents))
    thr = torch.tensor(list(thresholds), dtype=torch.float32)

    def rate(ps: Sequence[str]) -> Optional[float]:
        return float((table.rows(ps)[:, cols] > thr).any(1).float().mean()) if ps else None

    out: dict[str, Any] = {"families": {f.name: {"concept": rate(f.concept), "twins": rate(f.twins), "n": len(f.concept)}
                                        for f in _check_families(families)}}
    out["references"] = {g: rate(list(p)) for g, p in (references or {}).items()}
    return out


@dataclass
class TransferMatrix:
    """Row per left-out family: the selection made without it and its rates on every family and on the
    held-out references. `held_out(h)` = the rates on the family the selection never saw."""

    rows: list[dict[str, Any]]

    def held_out(self, family: str) -> dict[str, Any]:
        for r in self.rows:
            if r["left_out"] == family:
                return r["rates"]["families"][family]
        raise ValueError(f"no row leaves out {family!r}: expected one of {[r['left_out'] for r in self.rows]}")

    def mean_held_out(self) -> dict[str, Optional[float]]:
        """Mean over rows of the left-out family's concept and twin flag rates and the reference rates."""
        con = [self.held_out(r["left_out"])["concept"] for r in self.rows]
        tw = [t for t in (self.held_out(r["left_out"])["twins"] for r in self.rows) if t is not None]
        out: dict[str, Optional[float]] = {"concept": sum(con) / len(con), "twins": sum(tw) / len(tw) if tw else None}
        for g in self.rows[0]["rates"]["references"]:
            out[g] = sum(r["rates"]["references"][g] for r in self.rows) / len(self.rows)
        return out


def transfer_matrix(table: ActivationTable, families: Sequence[Family], references: dict[str, Sequence[str]],
                    held_references: Optional[dict[str, Sequence[str]]] = None, max_size: int = 1,
                    **options: Any) -> TransferMatrix:
    """Leave-one-family-out: for each family h, `contrastive` on the other families (+ `references`),
    the best latent (`max_size=1`) or greedy set, and its rates on every family and on `held_references`
    (captions not used for thresholds; default `references`). `options` go to `contrastive`."""
    fams = _check_families(families)
    if len(fams) < 2:
        raise ValueError(f"{len(fams)} family: leave-one-family-out needs at least 2")
    held = references if held_references is None else held_references
    rows = []
    for h in fams:
        fit = contrastive(table, [f for f in fams if f.name != h.name], references, **options)
        sel = fit.selection(fit.top(1)) if max_size == 1 else fit.select(max_size)
        rows.append({"left_out": h.name, "latents": sel.latents, "thresholds": sel.thresholds,
                     "train_objective": sel.objective,
                     "rates": evaluate(table, sel.latents, sel.thresholds, fams, held)})
    return TransferMatrix(rows)

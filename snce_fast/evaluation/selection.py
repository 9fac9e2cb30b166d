"""Selection and edit strength chosen together (docs/identification.md, "Efficacy in the loop"): each
candidate latent set from contrastive identification (`Contrastive.candidates()`), gated at its
thresholds, is edited at each strength and measured with `measure_erasure`; the choice is the edit
that most lowers the fixed reader's hits on concept prompts while at least `min_twins_identical` of
the neutral twins stay bit-identical (ties: fewer latents, then the milder strength, in the order given).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from snce_fast.evaluation.efficacy import Embeddings, PromptSets, measure_erasure, snce_edit

# the strengths tried by default: the residual edit's scale 0 (remove), -2, -4 (push back), and a clamp
STRENGTHS: tuple[dict[str, float], ...] = ({"scale": 0.0}, {"scale": -2.0}, {"scale": -4.0}, {"clamp": -1.0})
MIN_TWINS_IDENTICAL = 0.9


def strength_label(strength: dict[str, float]) -> str:
    return f"clamp {strength['clamp']:g}" if "clamp" in strength else f"scale {strength.get('scale', 0.0):g}"


@dataclass
class EditChoice:
    """The chosen (latents, thresholds, strength) and every measured row (JSON-ready)."""

    latents: list[int]
    thresholds: list[float]
    strength: dict[str, float]
    meets_twin_bound: bool
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.latents} {strength_label(self.strength)}"


def choose_edit(pipe_or_encoder: Any, sae: Any, selections: Sequence[Any], sets: PromptSets,
                strengths: Sequence[dict[str, float]] = STRENGTHS, min_twins_identical: float = MIN_TWINS_IDENTICAL,
                min_tokens: int = 1, tokenizer: Any = None, embeddings: Optional[Embeddings] = None,
                fpr: float = 0.05, progress: bool = False, **measure_options: Any) -> EditChoice:
    """Measure every (selection, strength) on `sets` (its `pairs` give the twins) and choose one (module doc).
    `selections`: objects with `.latents` and `.thresholds` (e.g. `Contrastive.candidates()`)."""
    if not selections:
        raise ValueError("selections is empty: expected candidate latent sets (e.g. Contrastive.candidates())")
    if not strengths:
        raise ValueError("strengths is empty: expected e.g. [{'scale': 0.0}, {'clamp': -1.0}]")
    if not sets.pairs:
        raise ValueError("sets.pairs is empty: choosing an edit needs neutral twins to keep bit-identical")
    if isinstance(min_twins_identical, bool) or not 0.0 <= float(min_twins_identical) <= 1.0:
        raise ValueError(f"min_twins_identical={min_twins_identical!r} is invalid: expected a share in [0, 1]")
    edits: dict[str, Any] = {}
    keys: list[tuple[Any, dict[str, float], str]] = []
    for sel in selections:
        for st in strengths:
            label = f"{list(sel.latents)} {strength_label(st)}"
            if label in edits:
                continue
            edits[label] = snce_edit(sae, list(sel.latents), gate=True, threshold=list(sel.thresholds),
                                     min_tokens=min_tokens, name=label, **st)
            keys.append((sel, st, label))
    res = measure_erasure(pipe_or_encoder, sets, edits, tokenizer=tokenizer, fpr=fpr, embeddings=embeddings,
                          progress=progress, **measure_options)
    rows = []
    for order, (sel, st, label) in enumerate(keys):
        r = res.reports[label]
        p = r["pairs"]
        rows.append({"latents": list(sel.latents), "thresholds": list(sel.thresholds), "strength": dict(st),
                     "label": label, "concept_flag_before": r["concept_flag_before"],
                     "concept_flag_after": r["concept_flag_after"], "survival": r["survival"],
                     "concept_changed": r["concept_changed"],
                     "twins_identical": 1.0 - p["neutral_changed"], "pair_concept_flag_after": p["concept_flag_after"],
                     "generic_changed": r["generic"]["changed"], "order": order})
    ok = [r for r in rows if r["twins_identical"] >= min_twins_identical - 1e-12]
    pool = ok or sorted(rows, key=lambda r: -r["twins_identical"])[:1]
    best = min(pool, key=lambda r: (r["concept_flag_after"], len(r["latents"]), r["order"]))
    return EditChoice(best["latents"], best["thresholds"], best["strength"], bool(ok), rows)

"""Red-teaming an erasure through the text encoder (docs/robustness.md).

    victim       Victim (encoder + defence + fixed reader, counted encoder calls), Defence, Gate, judge
    ring_a_bell  the black-box, model-agnostic genetic search (concept vector from pairs)
    whitebox     the erasure-aware GCG-style token substitution (evades the gate)
    harden       adversarial calibration: attack prompts join calibrate's targets, round after round
    records      AttackResult, summarize (ASR, fire rate, calls per success), prompt files
"""
from snce_fast.attack.records import AttackResult, attach_judgement, summarize, write_prompts
from snce_fast.attack.ring_a_bell import GAConfig, concept_vector, ring_a_bell
from snce_fast.attack.victim import (
    Defence, Gate, Victim, fit_defences, judge, leace_defence, no_edit_defence, snce_defence,
    vocabulary,
)
from snce_fast.attack.whitebox import WhiteboxConfig, score_candidates, whitebox

__all__ = [
    "AttackResult", "Defence", "GAConfig", "Gate", "Victim", "WhiteboxConfig", "attach_judgement", "concept_vector",
    "fit_defences", "judge", "leace_defence", "no_edit_defence", "ring_a_bell", "score_candidates", "snce_defence", "summarize",
    "vocabulary", "whitebox", "write_prompts",
]

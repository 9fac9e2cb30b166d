"""calibration.json: the latents and firing thresholds chosen by `snce-fast calibrate`
(docs/formats.md#calibrationjson, the rule in docs/identification.md).

`calibration_record` builds the record from plain values; `read_calibration` reads and checks a
file (`detect / erase / eval --calibration`): its neurons, one finite threshold per neuron, the
firing rule (`min_tokens`, `max_length`) and the SAE it was made with.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from snce_fast.records.jsonfile import (
    PathLike,
    check_n_latents,
    get_field,
    is_int,
    is_number,
    latent_list,
    read_json_record,
    record_sae_hash,
)

FORMAT = "snce_fast.calibration"
WRITER = "snce-fast calibrate"


def ranked_entry(latent: int, threshold: float, recall: float, rates: dict[str, float]) -> dict[str, Any]:
    """One entry of `ranked`: a candidate, its calibrated threshold, its recall on the target prompts
    and its flag rate on each reference group (`rate_<group>`)."""
    return {"latent": int(latent), "threshold": float(threshold), "recall": float(recall),
            **{f"rate_{g}": float(r) for g, r in rates.items()}}


def calibration_record(*, sae: str, sae_hash: Optional[str], model: str, encoder: str, penultimate_output: bool,
                       target: str, references: dict[str, int], fpr: dict[str, float], min_tokens: int,
                       max_length: Optional[int], neurons: Sequence[int], thresholds: Sequence[float],
                       ranked: list[dict[str, Any]], gate_threshold: Optional[float] = None) -> dict[str, Any]:
    """The calibration.json record. `thresholds` holds one value per neuron, in `neurons` order;
    `gate_threshold` (the single-float fallback) defaults to the largest of them."""
    neurons = [int(j) for j in neurons]
    thresholds = [float(t) for t in thresholds]
    if not neurons:
        raise ValueError("neurons is empty: a calibration record holds at least one latent")
    if len(thresholds) != len(neurons):
        raise ValueError(f"thresholds has {len(thresholds)} values for {len(neurons)} neurons: expected one per neuron")
    return {
        "format": FORMAT, "sae": str(sae), "sae_hash": sae_hash, "model": str(model), "encoder": str(encoder),
        "penultimate_output": bool(penultimate_output), "target": str(target),
        "references": {g: int(n) for g, n in references.items()},
        "fpr": {g: float(r) for g, r in fpr.items()}, "min_tokens": int(min_tokens), "max_length": max_length,
        "neurons": neurons, "thresholds": thresholds,
        "gate_threshold": float(max(thresholds) if gate_threshold is None else gate_threshold),
        "ranked": list(ranked),
    }


def read_calibration(path: PathLike, sae_hash: Optional[str] = None,
                     n_latents: Optional[int] = None) -> dict[str, Any]:
    """A calibration.json written by `snce-fast calibrate`, checked: `neurons` (distinct latent
    indices, in range for `n_latents` when given), `thresholds` (one finite number per neuron),
    `min_tokens` (a positive int, default 1) and `max_length` (a positive int or null); with
    `sae_hash` the file must come from that SAE. The returned record has `min_tokens` and
    `max_length` filled in."""
    record = read_json_record(path, FORMAT, WRITER)
    record_sae_hash(record, path, sae_hash)
    n = check_n_latents(record, path, n_latents)
    neurons = get_field(record, path, "neurons", lambda v: isinstance(v, list) and bool(v),
                        "a non-empty list of latent indices")
    neurons = latent_list(record, path, "neurons", neurons, n)
    if len(set(neurons)) != len(neurons):
        repeated = next(j for j in neurons if neurons.count(j) > 1)
        raise ValueError(f"{str(path)!r}: field 'neurons' lists latent {repeated} twice: expected distinct latents")
    thresholds = get_field(record, path, "thresholds", lambda v: isinstance(v, list) and all(map(is_number, v)),
                           "a list of finite numbers, one per neuron")
    if len(thresholds) != len(neurons):
        raise ValueError(f"{str(path)!r}: field 'thresholds' has {len(thresholds)} values for {len(neurons)} "
                         "neurons: expected one per neuron")
    record["min_tokens"] = get_field(record, path, "min_tokens", lambda v: is_int(v) and v > 0, "a positive int",
                                     required=False, default=1)
    record["max_length"] = get_field(record, path, "max_length", lambda v: is_int(v) and v > 0,
                                     "a positive int or null", required=False)
    return record

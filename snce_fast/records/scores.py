"""scores.json: the ranked latents of `snce-fast score --out DIR` (docs/formats.md#scoresjson).

`scores_record` builds the record from plain values, `read_scores` reads and checks a file
(`detect --scores`, `calibrate --candidates`), `top_latents` takes its best latents.
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

FORMAT = "snce_fast.scores"
WRITER = "snce-fast score"
LEVELS = ("prompt", "token")


def top_entry(rank: int, latent: int, score: float, frequency: dict[str, float], token_frequency: dict[str, float],
              mean_activation: dict[str, float]) -> dict[str, Any]:
    """One entry of `top`: the latent, its score, and its per-group statistics ({group: value})."""
    return {"rank": int(rank), "latent": int(latent), "score": float(score),
            "frequency": {g: float(v) for g, v in frequency.items()},
            "token_frequency": {g: float(v) for g, v in token_frequency.items()},
            "mean_activation": {g: float(v) for g, v in mean_activation.items()}}


def scores_record(*, method: str, level: str, target: str, references: Sequence[str], stats: str,
                  sae_hash: Optional[str], n_latents: int, n_prompts: dict[str, int],
                  top: list[dict[str, Any]]) -> dict[str, Any]:
    """The scores.json record: the method, the groups, the scan it came from and the `top` entries
    (see `top_entry`; best first)."""
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is invalid: expected one of {LEVELS}")
    if not top:
        raise ValueError("top is empty: a scores record lists at least one latent")
    return {
        "format": FORMAT,
        "method": str(method),
        "level": level,
        "target": str(target),
        "references": [str(g) for g in references],
        "stats": str(stats),
        "sae_hash": sae_hash,
        "n_latents": int(n_latents),
        "n_prompts": {g: int(n) for g, n in n_prompts.items()},
        "top": list(top),
    }


def read_scores(path: PathLike, sae_hash: Optional[str] = None, n_latents: Optional[int] = None) -> dict[str, Any]:
    """A scores.json written by `snce-fast score`, checked: `format`, a non-empty `top` of entries with
    a `latent` index (and a finite `score`, where given); with `sae_hash` / `n_latents` (of the SAE it
    will be used with) the file's fields must agree and every latent must be in range."""
    record = read_json_record(path, FORMAT, WRITER)
    record_sae_hash(record, path, sae_hash)
    n = check_n_latents(record, path, n_latents)
    top = get_field(record, path, "top", lambda v: isinstance(v, list) and bool(v) and
                    all(isinstance(e, dict) for e in v), "a non-empty list of {latent, score, ...} entries")
    latent_list(record, path, "top[].latent", [e.get("latent") for e in top], n)
    for e in top:
        if "score" in e and not is_number(e["score"]):
            raise ValueError(f"{str(path)!r}: field 'top[].score' holds {e['score']!r}: expected a finite number")
        if "rank" in e and not is_int(e["rank"]):
            raise ValueError(f"{str(path)!r}: field 'top[].rank' holds {e['rank']!r}: expected an int")
    return record


def top_latents(record: dict[str, Any], n: Optional[int] = None) -> list[int]:
    """The latents of a scores record, best first (the first `n`; all when None)."""
    entries = record["top"] if n is None else record["top"][:n]
    return [int(e["latent"]) for e in entries]

"""Reading the JSON records snce_fast writes (scores.json, calibration.json; docs/formats.md).

A file that is not the record it should be is refused with a ValueError that names the file and
the field; a missing file is a FileNotFoundError naming it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]


def read_json_record(path: PathLike, fmt: str, writer: str) -> dict[str, Any]:
    """The JSON object in `path`, whose `format` field is `fmt` (a file written by `writer`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (or is not a file): expected a file written by {writer}")
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}): expected a file written by {writer}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(record).__name__}: expected an object written by {writer}")
    if record.get("format") != fmt:
        raise ValueError(f"{str(path)!r}: field 'format' is {record.get('format')!r}: expected {fmt!r} "
                         f"(a file written by {writer})")
    return record


def bad_field(path: PathLike, key: str, value: Any, expected: str) -> ValueError:
    """The error for a field that is missing or not what it should be."""
    got = "missing" if value is _MISSING else "null" if value is None else _short(value)
    return ValueError(f"{str(path)!r}: field {key!r} is {got}: expected {expected}")


_MISSING = object()


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def get_field(record: dict[str, Any], path: PathLike, key: str, check: Any, expected: str,
              required: bool = True, default: Any = None) -> Any:
    """record[key] when `check(value)` holds; `default` when the key is absent (or None) and not required."""
    value = record.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise bad_field(path, key, value, expected)
        return default
    if not check(value):
        raise bad_field(path, key, value, expected)
    return value


def latent_list(record: dict[str, Any], path: PathLike, key: str, values: list[Any],
                n_latents: Optional[int]) -> list[int]:
    """`values` (taken from field `key`) as latent indices: ints with 0 <= j < n_latents (when known)."""
    what = f"latent indices (ints{f' in 0..{n_latents - 1}' if n_latents else ' >= 0'})"
    for j in values:
        if not is_int(j) or j < 0 or (n_latents is not None and j >= n_latents):
            raise ValueError(f"{str(path)!r}: field {key!r} holds {_short(j)}: expected {what}")
    return [int(j) for j in values]


def check_n_latents(record: dict[str, Any], path: PathLike, n_latents: Optional[int]) -> Optional[int]:
    """The file's `n_latents` field (optional), checked against the SAE's when both are known; the
    number of latents to check indices against."""
    recorded = get_field(record, path, "n_latents", lambda v: is_int(v) and v > 0, "a positive int",
                         required=False)
    if n_latents is not None and recorded is not None and recorded != n_latents:
        raise ValueError(f"{str(path)!r}: field 'n_latents' is {recorded}, but the SAE given has {n_latents} "
                         "latents: expected the SAE the file was made with")
    return n_latents if n_latents is not None else recorded


def check_sae_hash(recorded: Optional[str], expected: Optional[str], source: str) -> None:
    """`source` (a scan, a scores or calibration file) was made with the SAE whose `sae_hash` is
    `expected` (snce_fast.sae.fingerprint.sae_hash): the hashes agree, or one of them is unknown."""
    if recorded and expected and recorded != expected:
        raise ValueError(f"{source} was computed with a different SAE than the one given (its sae_hash "
                         f"{recorded[:12]}... is not {expected[:12]}...): expected the SAE that was scanned")


def record_sae_hash(record: dict[str, Any], path: PathLike, expected: Optional[str]) -> Optional[str]:
    """The file's `sae_hash` field (optional), checked against `expected`."""
    recorded = get_field(record, path, "sae_hash", lambda v: isinstance(v, str) and bool(v),
                         "the sha256 of the SAE (a hex string)", required=False)
    check_sae_hash(recorded, expected, repr(str(path)))
    return recorded

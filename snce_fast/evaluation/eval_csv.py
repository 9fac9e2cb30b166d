"""The prompts of an evaluation: rows of an I2P-style CSV (prompt, evaluation_seed,
evaluation_guidance), parsed and checked with one-line errors naming the file, column or row
(docs/evaluation.md, "Input: an I2P-style CSV")."""
from __future__ import annotations

import csv
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

I2P_COLUMNS = ("prompt", "evaluation_seed", "evaluation_guidance")


@dataclass(frozen=True)
class EvalRow:
    """One prompt to evaluate: `row` is its 1-based data row number in the CSV."""

    row: int
    prompt: str
    seed: int
    guidance: Optional[float]


def check_guidance(value: float, name: str = "guidance") -> float:
    """A classifier-free guidance scale: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} {value}: expected a number >= 0")
    return float(value)


def check_limit(limit: Optional[int], name: str = "limit") -> Optional[int]:
    """A number of rows to evaluate: None (all) or a positive integer."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"{name} {limit}: expected a positive integer")
    return limit


def _parse_seed(text: str, row: int, column: str) -> int:
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and (not math.isfinite(value) or value != int(value))):
        raise ValueError(f"row {row}: {column} {text!r} is not an integer seed")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"row {row}: {column} {text!r} is out of range (expected 0 <= seed < 2**64)")
    return value


def _parse_guidance(text: str, row: int, column: str) -> float:
    try:
        return check_guidance(float(text))
    except ValueError:
        raise ValueError(f"row {row}: {column} {text!r} is not a guidance scale (expected a number >= 0)") from None


def _column_index(path: Path, header: list[str], columns: dict[str, Optional[str]]) -> dict[str, int]:
    """{what: position} of the wanted columns (those not None) in the header."""
    index = {}
    for what, name in columns.items():
        if name is None:
            continue
        if name not in header:
            raise ValueError(f"{path}: no {what} column {name!r}; columns present: {', '.join(header)}")
        index[what] = header.index(name)
    return index


def read_eval_csv(
    path: Union[str, os.PathLike],
    prompt_column: str = "prompt",
    seed_column: str = "evaluation_seed",
    guidance_column: Optional[str] = "evaluation_guidance",
    limit: Optional[int] = None,
) -> tuple[list[EvalRow], int]:
    """The rows to evaluate and how many were skipped for a blank prompt.

    `guidance_column=None` leaves guidance to the pipeline default (or a caller override).
    Raises FileNotFoundError / ValueError with one line naming the file, column or row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV {str(path)!r} does not exist (or is not a file)")
    check_limit(limit)
    rows: list[EvalRow] = []
    skipped = 0
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty CSV file: expected a header row")
        header = [h.lstrip("\ufeff").strip() for h in header]
        index = _column_index(path, header, {"prompt": prompt_column, "seed": seed_column,
                                             "guidance": guidance_column})
        try:
            for n, record in enumerate(reader, start=1):
                if limit is not None and len(rows) >= limit:
                    break
                if not record or not any(v.strip() for v in record):
                    skipped += 1
                    continue
                if len(record) < len(header):
                    raise ValueError(f"{path}: row {n} has {len(record)} fields; the header has {len(header)}")
                prompt = record[index["prompt"]].strip()
                if not prompt:
                    skipped += 1
                    continue
                seed = _parse_seed(record[index["seed"]].strip(), n, seed_column)
                guidance = (_parse_guidance(record[index["guidance"]].strip(), n, guidance_column)
                            if "guidance" in index else None)
                rows.append(EvalRow(n, prompt, seed, guidance))
        except csv.Error as e:
            raise ValueError(f"{path}: malformed CSV near line {reader.line_num}: {e}") from None
    if not rows:
        raise ValueError(f"{path}: no rows with a non-blank {prompt_column!r} to evaluate")
    return rows, skipped

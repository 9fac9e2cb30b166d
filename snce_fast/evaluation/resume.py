"""What makes an evaluation resumable (docs/evaluation.md, "Interrupting and resuming"): the
run's settings in settings.json, which a rerun must match, and one line per finished row in
results.jsonl, appended and fsynced as each row completes."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from snce_fast.evaluation.eval_csv import EvalRow
from snce_fast.records.atomic import atomic_write_text, json_text

RESULTS = "results.jsonl"
SETTINGS = "settings.json"
VARIANTS = ("original", "erased")  # the two images of a row, as keyed in results.jsonl


def normalise(obj: Any) -> Any:
    """`obj` as it comes back from disk: tuples -> lists, keys -> str."""
    return json.loads(json.dumps(obj))


def _first_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} then, {new.get(key)!r} now"
    return None


def check_resume(out: Union[str, os.PathLike], settings: Mapping[str, Any]) -> bool:
    """Whether `out` holds an earlier run; raises ValueError if it was made with other settings."""
    path = Path(out) / SETTINGS
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is not valid JSON: delete the output directory or use another --out") from None
    diff = _first_difference(old, normalise(settings))
    if diff:
        raise ValueError(f"{out} holds a run with different settings ({diff}): use another --out or delete it")
    return True


def load_results(out: Union[str, os.PathLike]) -> dict[int, dict[str, Any]]:
    """Finished rows of `out/results.jsonl` by row number; a torn last line (a crash while
    appending) is dropped from the file."""
    path = Path(out) / RESULTS
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    done: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            done[int(rec["row"])] = rec
        except (ValueError, KeyError, TypeError):
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a result record") from None
            atomic_write_text(path, "".join(lines[:i]))
    return done


def check_rows_unchanged(out: Union[str, os.PathLike], rows: Sequence[EvalRow],
                         done: Mapping[int, Mapping[str, Any]]) -> None:
    """Raise ValueError if a finished row was run with another prompt, seed or guidance."""
    for r in rows:
        rec = done.get(r.row)
        if rec is not None and (rec["prompt"], rec["seed"], rec["guidance"]) != (r.prompt, r.seed, r.guidance):
            raise ValueError(f"{out}: row {r.row} was run with another prompt/seed/guidance (the CSV changed): "
                             "use another --out or delete it")


def append_result(out: Union[str, os.PathLike], record: Mapping[str, Any]) -> None:
    """Append one finished row to out/results.jsonl and fsync it."""
    with open(Path(out) / RESULTS, "a", encoding="utf-8") as f:
        f.write(json_text(record, indent=None))
        f.flush()
        os.fsync(f.fileno())

"""Streaming prompt corpora (docs/formats.md): `.txt`, `.csv`, `.jsonl`, `.parquet`.

Files are read row by row, never whole. Every row carries the offset to resume from after
it (a byte offset for text formats, a row number for parquet), so a scan can stop and
resume exactly. Blank, undecodable and malformed rows are skipped and counted, never fatal.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

FORMATS = {".txt": "txt", ".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
SKIP_REASONS = ("blank", "undecodable", "malformed", "no_column")  # no_column: a JSONL object without the column


@dataclass(frozen=True)
class Row:
    """One corpus row: `prompt`, or `skip` (a reason from SKIP_REASONS) when it was skipped;
    `next_offset` is where reading resumes after this row."""

    prompt: Optional[str]
    skip: Optional[str]
    next_offset: int


def _undecodable(text: str) -> bool:
    """Whether text holds bytes that were not UTF-8 (kept as lone surrogates by surrogateescape)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _check(text: Optional[str], next_offset: int) -> Row:
    if text is None or not text.strip():
        return Row(None, "blank", next_offset)
    if _undecodable(text):
        return Row(None, "undecodable", next_offset)
    return Row(text.strip(), None, next_offset)


class PromptFile:
    """A prompt file; `rows(start)` streams it from offset `start` (0 = the beginning)."""

    def __init__(self, path: Union[str, os.PathLike], column: str = "prompt"):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in FORMATS:
            raise ValueError(f"{self.path}: unsupported prompt file type {suffix!r}: expected one of {sorted(FORMATS)}")
        if not self.path.is_file():
            raise FileNotFoundError(f"prompt file {self.path} does not exist")
        self.format = FORMATS[suffix]
        self.column = column
        self.name = str(self.path)

    def identity(self) -> dict[str, Any]:
        return {"kind": "file", "path": str(self.path.resolve()), "size": self.path.stat().st_size}

    def rows(self, start: int = 0) -> Iterator[Row]:
        return getattr(self, f"_rows_{self.format}")(start)

    # -- text formats -----------------------------------------------------------------
    def _lines(self, start: int) -> Iterator[tuple[str, int]]:
        """(decoded line, byte offset after it); bad bytes survive as lone surrogates."""
        with open(self.path, "rb") as f:
            f.seek(start)
            pos = start
            for raw in f:
                pos += len(raw)
                yield raw.decode("utf-8", errors="surrogateescape"), pos

    def _rows_txt(self, start: int) -> Iterator[Row]:
        for line, pos in self._lines(start):
            yield _check(line.rstrip("\r\n"), pos)

    def _rows_jsonl(self, start: int) -> Iterator[Row]:
        for line, pos in self._lines(start):
            if not line.strip():
                yield Row(None, "blank", pos)
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield Row(None, "undecodable" if _undecodable(line) else "malformed", pos)
                continue
            if isinstance(obj, dict) and self.column not in obj:
                yield Row(None, "no_column", pos)
                continue
            if not isinstance(obj, dict) or not isinstance(obj[self.column], (str, type(None))):
                yield Row(None, "malformed", pos)
                continue
            yield _check(obj.get(self.column), pos)

    def _csv_header(self) -> tuple[list[str], int]:
        pos = [0]

        def lines() -> Iterator[str]:
            for line, after in self._lines(0):
                pos[0] = after
                yield line

        try:
            header = next(csv.reader(lines()))
        except StopIteration:
            raise ValueError(f"{self.path}: empty CSV file: expected a header with a {self.column!r} column") from None
        header = [h.lstrip("\ufeff").strip() for h in header]
        if self.column not in header:
            raise ValueError(f"{self.path}: no {self.column!r} column in the CSV header; columns found: {header}")
        return header, pos[0]

    def _rows_csv(self, start: int) -> Iterator[Row]:
        header, body = self._csv_header()
        col = header.index(self.column)
        pos = [max(start, body)]

        def lines() -> Iterator[str]:
            for line, after in self._lines(pos[0]):
                pos[0] = after
                yield line

        reader = csv.reader(lines())
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield Row(None, "malformed", pos[0])
                continue
            if not record:  # an empty line
                yield Row(None, "blank", pos[0])
            elif len(record) <= col:
                yield Row(None, "malformed", pos[0])
            else:
                yield _check(record[col], pos[0])

    # -- parquet ----------------------------------------------------------------------
    def _rows_parquet(self, start: int) -> Iterator[Row]:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {self.path} needs pyarrow: pip install 'snce_fast[parquet]' ({e})") from None
        pf = pq.ParquetFile(self.path)
        names = pf.schema_arrow.names
        if self.column not in names:
            raise ValueError(f"{self.path}: no {self.column!r} column in the parquet file; columns found: {names}")
        first = 0
        for rg in range(pf.num_row_groups):
            count = pf.metadata.row_group(rg).num_rows
            if first + count > start:
                values = pf.read_row_group(rg, columns=[self.column]).column(0).to_pylist()
                for i in range(max(0, start - first), count):
                    v = values[i]
                    if isinstance(v, bytes):
                        v = v.decode("utf-8", errors="surrogateescape")
                    if v is not None and not isinstance(v, str):
                        yield Row(None, "malformed", first + i + 1)
                    else:
                        yield _check(v, first + i + 1)
            first += count


class PromptList:
    """Prompts given inline; offsets are list positions."""

    def __init__(self, prompts: Sequence[str], name: str = "<prompts>"):
        self.prompts = list(prompts)
        self.name = name

    def identity(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(str(p).encode("utf-8", errors="surrogatepass") + b"\0")
        return {"kind": "list", "count": len(self.prompts), "sha256": h.hexdigest()}

    def rows(self, start: int = 0) -> Iterator[Row]:
        for i in range(start, len(self.prompts)):
            p = self.prompts[i]
            yield _check(p, i + 1) if isinstance(p, (str, type(None))) else Row(None, "malformed", i + 1)


Source = Union[PromptFile, PromptList]


def is_prompt_file(item: Any) -> bool:
    """A Path, or a str naming an existing file with a known suffix."""
    if isinstance(item, Path):
        return True
    return isinstance(item, str) and Path(item).suffix.lower() in FORMATS and os.path.isfile(item)


def looks_like_path(text: str) -> bool:
    """Whether a str reads as a file path rather than a prompt: one line with a prompt-file suffix
    (.txt/.csv/.jsonl/.parquet) or a path separator."""
    if "\n" in text or not text.strip():
        return False
    seps = [sep for sep in (os.sep, os.altsep) if sep]
    return Path(text.strip()).suffix.lower() in FORMATS or any(sep in text for sep in seps)


def _refuse_str(item: str, name: str, bare: bool) -> None:
    """Raise for a str of group `name` that is not an existing prompt file: always for the whole group
    (`bare`), in a list only when it reads as a path (then it is a mistyped file, not a prompt)."""
    where = f"group {name!r}"
    if os.path.isdir(item):
        raise ValueError(f"{where}: {item!r} is a directory: expected a prompt file ({'/'.join(FORMATS)}) "
                         "or a list of prompts")
    if os.path.exists(item):
        raise ValueError(f"{where}: {item!r} has an unsupported prompt file type {Path(item).suffix.lower()!r}: "
                         f"expected one of {sorted(FORMATS)}")
    if bare or Path(item.strip()).suffix.lower() in FORMATS:
        if looks_like_path(item):
            raise FileNotFoundError(f"{where}: prompt file {item!r} does not exist")
        raise ValueError(f"{where} is the single string {item!r}, which is not a prompt file: give a list of "
                         f"prompts (e.g. [{item!r}]) or a prompt file")


def _file(item: Union[str, os.PathLike], name: str, column: str) -> PromptFile:
    try:
        return PromptFile(item, column)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"group {name!r}: {e}") from None


def sources(items: Union[str, os.PathLike, Iterable[Any]], name: str = "<prompts>", column: str = "prompt") -> list[Source]:
    """Files and inline prompts of one group, in order; runs of inline prompts form one PromptList.

    `items` is one prompt file (a Path, or a str naming an existing .txt/.csv/.jsonl/.parquet file) or a
    list of files and inline prompts. A bare str that is not an existing prompt file is refused, never
    read as a one-prompt group: FileNotFoundError when it reads as a path (`looks_like_path`), else
    ValueError (give a single prompt as a list: ["a prompt"]). In a list, a str with a prompt-file suffix
    that does not exist, or one that reads as a path and names an existing non-prompt file or directory,
    is refused the same way; any other str is a prompt."""
    if isinstance(items, str) and not is_prompt_file(items):
        _refuse_str(items, name, bare=True)
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    if not isinstance(items, Iterable) or isinstance(items, (bytes, dict)):
        raise TypeError(f"group {name!r} is {items!r} ({type(items).__name__}): expected a list of prompts or a "
                        "prompt file")
    out: list[Source] = []
    run: list[str] = []
    for item in items:
        if isinstance(item, str) and not is_prompt_file(item) and looks_like_path(item):
            _refuse_str(item, name, bare=False)
        if is_prompt_file(item) or isinstance(item, os.PathLike):
            if run:
                out.append(PromptList(run, f"{name}[{len(out)}]"))
                run = []
            out.append(_file(item, name, column))
        else:
            run.append(item)
    if run:
        out.append(PromptList(run, f"{name}[{len(out)}]"))
    return out


def skips_before_a_prompt(srcs: Sequence[Source]) -> Optional[dict[str, int]]:
    """None when `srcs` hold a usable prompt (each source read only up to its first one), else the rows
    they skipped, by reason (all zero: no rows at all)."""
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for src in srcs:
        with contextlib.closing(src.rows()) as rows:
            for row in rows:
                if row.skip is None:
                    return None
                skipped[row.skip] = skipped.get(row.skip, 0) + 1
    return skipped


def require_prompts(name: str, srcs: Sequence[Source]) -> None:
    """ValueError when group `name`'s sources hold no usable prompt (no rows, or every row blank,
    undecodable or malformed). Reads each source only up to its first usable prompt."""
    skipped = skips_before_a_prompt(srcs)
    if skipped is None:
        return
    where = ", ".join(repr(s.name) if isinstance(s, PromptFile) else "its inline prompts" for s in srcs)
    detail = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n)
    raise ValueError(f"group {name!r} has no usable prompts in {where or 'nothing (no files or prompts given)'}"
                     + (f" (rows skipped: {detail})" if detail else " (no rows)"))


def read_prompts(path: Union[str, os.PathLike], column: str = "prompt", limit: Optional[int] = None,
                 skipped: Optional[dict[str, int]] = None) -> list[str]:
    """The prompts of a file (skipping bad rows), at most `limit` of them; the skipped rows are added up
    by reason into `skipped` when given."""
    out: list[str] = []
    with contextlib.closing(PromptFile(path, column).rows()) as rows:
        for row in rows:
            if row.prompt is None:
                if skipped is not None:
                    skipped[row.skip] = skipped.get(row.skip, 0) + 1
                continue
            out.append(row.prompt)
            if limit is not None and len(out) >= limit:
                break
    return out


__all__ = ["Row", "PromptFile", "PromptList", "Source", "sources", "require_prompts", "skips_before_a_prompt",
           "read_prompts", "is_prompt_file", "looks_like_path", "SKIP_REASONS"]


def read_labels(path: str, column: str, prompt_column: str = "prompt") -> list[Optional[bool]]:
    """Per usable prompt of a csv/jsonl file (e.g. `snce-fast detect --label-column`) (the rows the corpus reader keeps: blank and undecodable
    prompts skipped), its label as a bool (1/0, true/false, yes/no), or None when the label is blank."""
    pf = PromptFile(path, prompt_column)
    truthy, falsy = {"1", "true", "yes", "y", "t"}, {"0", "false", "no", "n", "f"}

    def usable(text: Any) -> bool:
        return isinstance(text, str) and _check(text, 0).skip is None

    def as_bool(v: Any, i: int) -> Optional[bool]:
        s = "" if v is None else str(v).strip().lower()
        if not s:
            return None  # unlabelled: left out of the rates
        try:
            return float(s) > 0
        except ValueError:
            pass
        if s in truthy or s in falsy:
            return s in truthy
        raise ValueError(f"--label-column {column!r}: row {i + 1} has {v!r}: expected 1/0, true/false or yes/no")

    labels: list[Optional[bool]] = []
    if pf.format == "csv":
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            fields = [h.lstrip("\ufeff").strip() for h in (reader.fieldnames or [])]
            if column not in fields:
                raise ValueError(f"--label-column {column!r}: no such column in {path}; columns found: {fields}")
            reader.fieldnames = fields
            for i, row in enumerate(reader):
                if usable(row.get(prompt_column)):
                    labels.append(as_bool(row[column], i))
    elif pf.format == "jsonl":
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for i, line in enumerate(f):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and usable(obj.get(prompt_column)):
                    if column not in obj:
                        raise ValueError(f"--label-column {column!r}: row {i + 1} of {path} has no such field")
                    labels.append(as_bool(obj[column], i))
    else:
        raise ValueError(f"--label-column needs a .csv or .jsonl --prompts-file, got {path!r}")
    return labels

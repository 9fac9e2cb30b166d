"""Prompt corpora: all four formats, blank/undecodable/malformed rows counted, resumable offsets."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from snce_fast.workflow.corpus import PromptFile, PromptList, read_prompts, sources

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "prompts"
BAD = b"caf\xe9 \xff broken"  # not UTF-8


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _check(path, want_prompts, want_skips):
    rows = list(PromptFile(path).rows())
    assert [r.prompt for r in rows if r.prompt is not None] == want_prompts
    assert Counter(r.skip for r in rows if r.skip) == Counter(want_skips)
    # resuming after any row gives the rest of the stream
    for i in range(len(rows)):
        assert list(PromptFile(path).rows(rows[i].next_offset)) == rows[i + 1 :]


def test_txt(tmp_path):
    p = _write(tmp_path, "p.txt", b"a cat\n\n   \n" + BAD + b"\r\na dog on a boat\r\nlast line no newline")
    _check(p, ["a cat", "a dog on a boat", "last line no newline"], ["blank", "blank", "undecodable"])


def test_csv(tmp_path):
    data = (
        b'\xef\xbb\xbfid,prompt,extra\n'
        b'1,"a cat, sitting",x\n'
        b'2,"a line\nthat continues",y\n'
        b'3,,z\n'
        b'4,' + BAD + b',w\n'
        b'5\n'
        b'6,fine prompt,\xff\n'
        b'\n'
        b'7,a dog,v\n'
    )
    p = _write(tmp_path, "p.csv", data)
    _check(p, ["a cat, sitting", "a line\nthat continues", "fine prompt", "a dog"],
           ["blank", "undecodable", "malformed", "blank"])


def test_csv_missing_column_names_columns(tmp_path):
    p = _write(tmp_path, "p.csv", b"id,text\n1,a cat\n")
    with pytest.raises(ValueError, match=r"no 'prompt' column.*\['id', 'text'\]"):
        list(PromptFile(p).rows())


def test_jsonl(tmp_path):
    lines = [json.dumps({"prompt": "a cat"}).encode(), b"", json.dumps({"prompt": ""}).encode(), b"{not json",
             json.dumps({"text": "no prompt key"}).encode(), b'{"prompt": "' + BAD + b'"}',
             json.dumps({"prompt": 3}).encode(), json.dumps({"prompt": "a dog \u00e9"}).encode()]
    p = _write(tmp_path, "p.jsonl", b"\n".join(lines) + b"\n")
    _check(p, ["a cat", "a dog \u00e9"], ["blank", "blank", "malformed", "no_column", "undecodable", "malformed"])


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    prompts = ["a cat", None, "  ", "a dog", "a boat", "a tree"]
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": list(range(6)), "prompt": prompts}), p, row_group_size=2)
    _check(p, ["a cat", "a dog", "a boat", "a tree"], ["blank", "blank"])
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(ValueError, match=r"columns found: \['text'\]"):
        list(PromptFile(tmp_path / "q.parquet").rows())


def test_sources_mix_files_and_inline(tmp_path):
    p = _write(tmp_path, "p.txt", b"x\ny\n")
    srcs = sources(["a", "b", str(p), "c"], "g")
    assert [type(s).__name__ for s in srcs] == ["PromptList", "PromptFile", "PromptList"]
    assert sources(p)[0].name == str(p)
    assert PromptList(["a", "", "b"]).identity() != PromptList(["a", "b"]).identity()
    with pytest.raises(ValueError, match="unsupported prompt file type '.xml'"):
        PromptFile(_write(tmp_path, "p.xml", b""))


@pytest.mark.skipif(not (SHARED / "i2p.csv").is_file(), reason="shared prompt data not present")
def test_real_i2p_matches_csv_module():
    import csv

    with open(SHARED / "i2p.csv", newline="", encoding="utf-8") as f:
        want = [r["prompt"].strip() for r in csv.DictReader(f) if r["prompt"].strip()]
    assert read_prompts(SHARED / "i2p.csv") == want
    assert len(want) > 4000

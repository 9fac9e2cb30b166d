"""scan's group values: a str is a prompt file or an error (never a one-prompt group), a path in a
list that does not exist is refused, and a group with no usable prompt is refused before any work."""
import importlib
import re
from pathlib import Path

import pytest
import torch

import snce_fast
from snce_fast.testing import clip_text_model, random_sae, write_clip_tokenizer
from snce_fast.workflow.corpus import sources

scan_mod = importlib.import_module("snce_fast.workflow.scan")  # the module (snce_fast.scan is the function)
REF = ["a red cat", "a blue dog on the street"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tok = write_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return tok, clip_text_model(tok, hidden=32, layers=2), random_sae(32, n=64, k=4, seed=1)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the scan gets as far as reading and tokenizing batches."""
    def started(*a, **k):
        raise AssertionError("the scan started work before refusing its input")

    monkeypatch.setattr(scan_mod, "Prefetcher", started)


def _scan(clip, groups):
    tok, enc, sae = clip
    return snce_fast.scan(enc, tok, sae, groups, progress=False, batch_size=4)


@pytest.mark.parametrize("value, error, match", [
    ("nope.txt", FileNotFoundError, r"group 'a': prompt file 'nope\.txt' does not exist"),
    ("NOPE.CSV", FileNotFoundError, r"group 'a': prompt file 'NOPE\.CSV' does not exist"),
    ("data/prompts", FileNotFoundError, r"group 'a': prompt file 'data/prompts' does not exist"),
    ("a red cat", ValueError, r"group 'a' is the single string 'a red cat'.*give a list of prompts"),
    (Path("nope.jsonl"), FileNotFoundError, r"group 'a': prompt file nope\.jsonl does not exist"),
    (["a cat", "missing.parquet"], FileNotFoundError, r"group 'a': prompt file 'missing\.parquet' does not exist"),
    (["a cat", Path("missing.txt")], FileNotFoundError, r"group 'a': prompt file missing\.txt does not exist"),
    (5, TypeError, r"group 'a' is 5 \(int\): expected a list of prompts or a prompt file"),
])
def test_missing_files_and_bare_strings_are_refused(clip, no_work, value, error, match):
    with pytest.raises(error, match=match):
        _scan(clip, {"a": value, "ref": REF})


def test_existing_non_prompt_paths_are_refused(clip, no_work, tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("a cat\n")
    with pytest.raises(ValueError, match=r"group 'a': .*p\.tsv' has an unsupported prompt file type '\.tsv'"):
        _scan(clip, {"a": ["a cat", str(tsv)], "ref": REF})
    with pytest.raises(ValueError, match=r"group 'a': .* is a directory"):
        _scan(clip, {"a": str(tmp_path), "ref": REF})


@pytest.mark.parametrize("content, detail", [(b"", "no rows"), (b"\n   \n\n", "rows skipped: 3 blank"),
                                             (b"\xff\xfe\n \n", "rows skipped: 1 blank, 1 undecodable")])
def test_group_without_usable_prompts_is_refused(clip, no_work, tmp_path, content, detail):
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=rf"group 'x' has no usable prompts in '{re.escape(str(f))}' \({detail}\)"):
        _scan(clip, {"x": str(f), "ref": REF})
    with pytest.raises(ValueError, match=rf"group 'x' has no usable prompts in '{re.escape(str(f))}', its inline prompts"):
        _scan(clip, {"x": [f, "  ", None], "ref": REF})


def test_empty_group_is_refused(clip, no_work):
    with pytest.raises(ValueError, match=r"group 'x' has no usable prompts in nothing"):
        _scan(clip, {"x": [], "ref": REF})


def test_nonfinite_sae_is_refused(clip, no_work):
    tok, enc, _ = clip
    sae = random_sae(32, n=64, k=4, seed=1)
    with torch.no_grad():
        sae.b_enc[:3] = float("nan")
    with pytest.raises(ValueError, match="b_enc has 3 NaN/inf values"):
        snce_fast.scan(enc, tok, sae, {"a": REF}, progress=False)


def test_inline_prompts_and_files_still_scan(clip, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a green boat\n\nthe sky at night\n")
    stats = _scan(clip, {"file": str(f), "mixed": [f, "AC/DC on the street", "a cat w/ a hat"], "ref": REF})
    assert stats.n_prompts.tolist() == [2, 4, 2]
    assert stats.skipped["file"]["blank"] == 1


def test_looks_like_path_and_sources():
    from snce_fast.workflow.corpus import looks_like_path

    assert looks_like_path("nope.txt") and looks_like_path("a/b") and looks_like_path("x.Parquet")
    assert not looks_like_path("a red cat") and not looks_like_path("two\nlines.txt") and not looks_like_path("")
    srcs = sources(["a cat", "AC/DC live", "a cat w/ a hat"], "g")  # separators alone keep a prompt a prompt
    assert [type(s).__name__ for s in srcs] == ["PromptList"] and len(srcs[0].prompts) == 3

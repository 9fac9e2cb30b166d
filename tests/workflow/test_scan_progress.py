"""scan's progress bar has a total (usable prompts) when the corpus can be counted quickly."""
import pytest

from snce_fast.workflow import scan as scan_module
from snce_fast.workflow.corpus import sources


def test_total_counts_usable_prompts_of_lists_and_files(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n   \na dog on a sofa\na red car\n")
    groups = [sources(["one", " ", "two"], "a"), sources(str(f), "b")]
    assert scan_module._prompt_total(groups) == 2 + 3


def test_no_total_for_a_file_too_large_to_count(tmp_path, monkeypatch):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n" * 100)
    monkeypatch.setattr(scan_module, "COUNT_LIMIT_BYTES", 10)
    assert scan_module._prompt_total([sources(str(f), "b")]) is None


def test_scan_bar_shows_the_total(tmp_path, capsys):
    pytest.importorskip("transformers")
    from snce_fast import scan
    from snce_fast.testing import bert_model, random_sae, write_bert_tokenizer

    tok = write_bert_tokenizer(tmp_path)
    enc = bert_model(tok)
    sae = random_sae(enc.config.hidden_size, 64, 4)
    scan(enc, tok, sae, {"a": ["a photo of the cat"] * 5, "b": ["the dog"] * 3}, batch_size=4, progress=True)
    assert "8/8" in capsys.readouterr().err

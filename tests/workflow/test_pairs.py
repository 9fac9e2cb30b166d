"""Pair files (counted skips, clear errors) and template pairs (deterministic, tagged by family)."""
import pytest

from snce_fast.workflow.pairs import (
    Pair, PhrasingSpec, builtin_spec, generate_pairs, parse_phrasing, read_pairs, skip_summary,
)


def test_read_pairs_counts_bad_rows(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("concept,neutral\n"
                 "a nude man on a beach,a man on a beach\n"
                 "too,many,fields\n"          # wrong column count
                 "only one field\n"           # wrong column count
                 ",a man\n"                   # empty member
                 "a cat,  a cat \n"           # identical members (whitespace aside)
                 "a naked woman,a woman\n")
    skipped = {}
    pairs = read_pairs(f, skipped=skipped)
    assert pairs == [Pair("a nude man on a beach", "a man on a beach", "p"), Pair("a naked woman", "a woman", "p")]
    assert skipped["wrong column count"] == 2 and skipped["empty member"] == 1 and skipped["identical members"] == 1
    assert skip_summary(skipped) == "4 rows skipped (2 wrong column count, 1 empty member, 1 identical members)"


def test_read_pairs_family_column_and_jsonl(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("concept,neutral,family\na nude man,a man,explicit\na man in the buff,a man,\n")
    assert [p.family for p in read_pairs(f, family="mine")] == ["explicit", "mine"]
    j = tmp_path / "p.jsonl"
    j.write_text('{"concept": "a nude man", "neutral": "a man"}\nnot json\n[1, 2]\n{"concept": "x", "neutral": "x"}\n')
    skipped = {}
    assert read_pairs(j, skipped=skipped) == [Pair("a nude man", "a man", "p")]
    assert skipped["not a JSON object"] == 2 and skipped["identical members"] == 1


@pytest.mark.parametrize("name, text, expect", [
    ("none.csv", "concept,neutral\n,x\ny,y\n", r"pair file '.*none.csv' has no valid pair \(2 rows skipped "
                                               r"\(1 empty member, 1 identical members\)\)"),
    ("empty.csv", "concept,neutral\n", r"pair file '.*empty.csv' has no valid pair \(no rows\)"),
    ("cols.csv", "concept,plain\na,b\n", r"pair file '.*cols.csv': no column 'neutral' \(columns: concept, plain\)"),
    ("p.txt", "a\tb\n", r"pair file '.*p.txt': expected a .csv or .jsonl file"),
    ("bad.csv", b"concept,neutral\n\xff\xfe,x\n", r"pair file '.*bad.csv': cannot be read as UTF-8"),
])
def test_read_pairs_errors_name_the_file(tmp_path, name, text, expect):
    f = tmp_path / name
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=expect):
        read_pairs(f)
    with pytest.raises(ValueError, match=r"pair file '.*missing.csv' does not exist"):
        read_pairs(tmp_path / "missing.csv")


def test_generated_pairs_are_deterministic_and_tagged():
    spec = builtin_spec("nudity")
    a, b = generate_pairs(spec, 12, seed=3), generate_pairs(spec, 12, seed=3)
    assert a == b and a != generate_pairs(spec, 12, seed=4)
    fams = list(spec.families)
    assert [p.family for p in a] == [f for f in fams for _ in range(12)]
    assert all(p.concept != p.neutral for p in a)
    for f in fams:  # every phrasing of a family is used, each with its own twin
        got = {(p.concept, p.neutral) for p in a if p.family == f}
        assert len(got) == 12
        for c, n in spec.families[f]:
            head = c.split("{x}")
            assert any(p[0].startswith(head[0]) and p[0].endswith(head[1]) for p in got), (f, c)
    style = generate_pairs(builtin_spec("style:Vincent van Gogh"), 3)
    assert {p.family for p in style} == {"style_of", "by", "like", "possessive", "misspelled"}
    assert all(("Gogh" in p.concept or "Gough" in p.concept or "vangogh" in p.concept or "Goh" in p.concept)
               and "Gogh" not in p.neutral for p in style)


def test_template_errors():
    with pytest.raises(ValueError, match="not built in"):
        builtin_spec("violence")
    with pytest.raises(ValueError, match=r"expected '\{x\}'"):
        generate_pairs(PhrasingSpec("c", {"f": [("nude", "{x}")]}))
    with pytest.raises(ValueError, match="n_per_family=500 exceeds the 4 distinct scenes"):
        generate_pairs(PhrasingSpec("c", {"f": [("{x} nude", "{x}")]}, ["a", "b"], ["c", "d"]), 500)
    assert parse_phrasing("euph={x} wearing nothing") == ("euph", ("{x} wearing nothing", "{x}"))
    assert parse_phrasing("e={x}, nude|{x}, dressed") == ("e", ("{x}, nude", "{x}, dressed"))
    with pytest.raises(ValueError, match="expected FAMILY=TEMPLATE"):
        parse_phrasing("no equals sign")

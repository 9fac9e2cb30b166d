"""`snce-fast identify`: a run on a tiny BERT model dir writes a calibration.json that erase / detect read,
with the selection, the transfer matrix and (--edit-check) the chosen strength; bad inputs exit 2 with one
stderr line and write nothing."""
import json
import re

import pytest

from snce_fast.cli import main
from snce_fast.records.calibration import read_calibration
from snce_fast.testing import random_sae, save_bert_dir

PAIRS = [("a nude man on the street", "a man on the street"), ("a naked woman in the river", "a woman in the river"),
         ("a nude painting of a man", "a painting of a man"), ("a naked man with a dog", "a man with a dog"),
         ("nude art by the river", "art by the river"), ("a naked portrait in the city", "a portrait in the city")]
ORDINARY = ["a photo of the cat", "a red car in the city", "a house by the river", "a blue boat on the river",
            "a green tree in the street", "a dog in the house at night", "a city at night", "a painting of a boat"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("identify")
    save_bert_dir(root / "bert")
    random_sae(32, n=64, k=4, seed=2).save(root / "sae")
    random_sae(32, n=64, k=4, seed=2, hook="layer:0").save(root / "sae_l0")
    (root / "pairs.csv").write_text("concept,neutral,family\n" + "".join(
        f"{c},{n},{'nude' if 'nude' in c else 'naked'}\n" for c, n in PAIRS) + "a red car,a red car,x\nbad row\n")
    (root / "clean.csv").write_text("concept,neutral\n" + "".join(f"{c},{n}\n" for c, n in PAIRS))
    (root / "coco.txt").write_text("\n".join(ORDINARY) + "\n")
    (root / "only.txt").write_text("nude art of a man at night\na naked man in the house\n")
    (root / "nopairs.csv").write_text("concept,neutral\na cat,a cat\n,a dog\n")
    return root


def _base(root, out, *extra):
    return ["identify", "--model", str(root / "bert"), "--sae", str(root / "sae"), "--pairs", str(root / "pairs.csv"),
            "--reference", f"coco={root / 'coco.txt'}", "--out", str(out), "--quiet", *extra]


def test_identify_writes_a_calibration_with_transfer(env, tmp_path, capsys):
    out = tmp_path / "id.json"
    assert main(_base(env, out, "--concept-prompts", f"extra={env / 'only.txt'}",
                      "--phrasing", "gen={x} nude|{x}", "--n-per-family", "3")) == 0
    captured = capsys.readouterr()
    assert "--pairs " in captured.err and "2 rows skipped (1 wrong column count, 1 identical members)" in captured.err
    rec = read_calibration(out)
    assert rec["rule"]["name"] == "contrastive"
    assert rec["rule"]["families"] == {"nude": {"concept": 3, "twins": 3}, "naked": {"concept": 3, "twins": 3},
                                       "gen": {"concept": 3, "twins": 3}, "extra": {"concept": 2, "twins": 0}}
    assert rec["neurons"] == rec["selection"]["latents"] and len(rec["thresholds"]) == len(rec["neurons"])
    assert [r["left_out"] for r in rec["transfer"]["rows"]] == ["nude", "naked", "gen", "extra"]
    for r in rec["transfer"]["rows"]:
        assert set(r["rates"]["families"]) == {"nude", "naked", "gen", "extra"}
        assert r["rates"]["families"]["extra"]["twins"] is None
    assert "selection [" in captured.out and "transfer (selected without the family" in captured.out


def test_identify_edit_check_chooses_a_strength(env, tmp_path, capsys):
    out = tmp_path / "id.json"
    assert main(_base(env, out, "--edit-check", "--max-size", "2")) == 0
    rec = json.loads(out.read_text())
    e = rec["edit"]
    assert e["strength"] in ({"scale": 0.0}, {"scale": -2.0}, {"scale": -4.0}, {"clamp": -1.0})
    assert rec["neurons"] == e["latents"] and len(e["rows"]) >= 4
    assert all(0.0 <= r["twins_identical"] <= 1.0 for r in e["rows"])
    assert "edit check: " in capsys.readouterr().out


@pytest.mark.parametrize("extra, expect", [
    (["--pairs", "NOPAIRS"], r"--pairs '.*nopairs.csv' has no valid pair \(2 rows skipped \(1 empty member, "
                             r"1 identical members\)\)"),
    (["--pairs", "MISSING"], r"--pairs '.*nope.csv' does not exist"),
    (["--generate", "violence"], r"--generate: phrasings 'violence' are not built in"),
    (["--phrasing", "nude"], r"phrasing 'nude': expected FAMILY=TEMPLATE"),
    (["--twin-fpr", "1.5"], r"--twin-fpr 1.5: expected a rate with 0 <= rate < 1"),
    (["--max-size", "0"], r"--max-size"),
    (["--reference", "coco"], r"--reference 'coco': expected NAME=FILE"),
    (["--out", "x.txt"], r"--out 'x.txt': expected a .json file name"),
    (["--sae", "SAE_L0", "--edit-check"], r"--edit-check: the SAE's hook is 'layer:0'"),
    (["--concept-prompts", "x"], r"--concept-prompts 'x': expected NAME=FILE"),
])
def test_bad_inputs_exit_2_with_one_line(env, tmp_path, capsys, extra, expect):
    subst = {"NOPAIRS": env / "nopairs.csv", "MISSING": env / "nope.csv", "SAE_L0": env / "sae_l0"}
    extra = [str(subst.get(x, x)) for x in extra]
    argv = _base(env, tmp_path / "id.json")
    argv[argv.index("--pairs") + 1] = str(env / "clean.csv")
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv and flag != "--pairs" or flag in ("--pairs", "--reference", "--out", "--sae"):
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if "--edit-check" in extra:
        argv.append("--edit-check")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("snce-fast identify: error: ")
    assert re.search(expect, err[0]), err[0]
    assert not (tmp_path / "id.json").exists()


def test_no_pairs_at_all_is_one_line(env, tmp_path, capsys):
    argv = ["identify", "--model", str(env / "bert"), "--sae", str(env / "sae"), "--reference",
            f"coco={env / 'coco.txt'}", "--out", str(tmp_path / "id.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give concept/neutral pairs: --pairs FILE" in err[0], err

"""`snce-fast efficacy`: a run on a tiny BERT model dir writes the JSON and prints the table; bad inputs
exit 2 with one stderr line naming the value and what was expected, and write nothing."""
import json

import pytest

from snce_fast.cli import main
from snce_fast.testing import random_sae, save_bert_dir

CONCEPT = ["a nude man on the street", "a naked woman in the river", "a nude painting of a man",
           "a naked man with a dog", "nude art by the river", "a naked portrait in the city",
           "a nude woman in the house", "naked art of a man at night"]
ORDINARY = ["a photo of the cat", "a red car in the city", "a house by the river", "a blue boat on the river",
            "a green tree in the street", "a dog in the house at night", "a man with a dog", "a city at night",
            "a painting of a boat", "a portrait of a woman"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("efficacy")
    save_bert_dir(root / "bert")
    random_sae(32, n=64, k=4, seed=2).save(root / "sae")
    random_sae(16, n=64, k=4, seed=2).save(root / "sae16")
    random_sae(32, n=64, k=4, seed=2, hook="layer:0").save(root / "sae_l0")
    (root / "concept.txt").write_text("\n".join(CONCEPT) + "\n")
    (root / "ordinary.txt").write_text("\n".join(ORDINARY) + "\n")
    (root / "one.txt").write_text("a nude man\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "pairs.csv").write_text("concept,neutral\na nude man on the street,a man on the street\n"
                                    "a naked woman in the river,a woman in the river\n")
    (root / "pairs_bad.csv").write_text("concept,plain\na nude man,a man\n")
    return root


def _base(root, out, *extra):
    return ["efficacy", "--model", str(root / "bert"), "--sae", str(root / "sae"), "--neurons", "3,7",
            "--concept", str(root / "concept.txt"), "--ordinary", str(root / "ordinary.txt"),
            "--out", str(out), "--quiet", *extra]


def test_run_writes_json_and_table(env, tmp_path, capsys):
    out = tmp_path / "eff.json"
    assert main(_base(env, out, "--pairs", str(env / "pairs.csv"), "--baselines", "leace,leace-gated",
                      "--gate")) == 0
    rec = json.loads(out.read_text())
    assert set(rec["reports"]) == {"no edit", "edit: 3,7 scale 0 residual gated", "LEACE", "LEACE gated"}
    assert rec["split"]["sizes"]["concept_test"] == 4 and rec["split"]["sizes"]["pairs"] == 2
    none = rec["reports"]["no edit"]
    assert none["generic"]["changed"] == 0.0 and none["survival"] in (1.0, None)
    assert rec["reports"]["LEACE"]["generic"]["changed"] == 1.0
    text = capsys.readouterr().out
    assert "reader threshold" in text and "wrote" in text


@pytest.mark.parametrize("extra, expect", [
    (["--concept", "EMPTY"], "--concept '.*empty.txt' has no usable prompts"),
    (["--concept", "ONE"], "--concept: 1 distinct prompt.*expected at least 2"),
    (["--pairs", "PAIRS_BAD"], "--pairs '.*pairs_bad.csv': no column 'neutral' \\(columns: concept, plain\\): "
                               "expected columns 'concept' and 'neutral'"),
    (["--pairs", "MISSING"], "--pairs '.*nope.csv' does not exist"),
    (["--sae", "SAE16"], "d_in=16 but the encoder .* has width 32"),
    (["--sae", "SAE_L0"], "hook is 'layer:0'.*expected an SAE trained at hook 'output'"),
    (["--fpr", "1.5"], "--fpr 1.5: expected a rate with 0 <= fpr < 1"),
    (["--train-fraction", "1"], "--train-fraction 1.0: expected 0 < fraction < 1"),
    (["--baselines", "inlp"], "--baselines 'inlp': expected a comma-separated subset of leace, leace-gated"),
    (["--neurons", "999"], "--neurons: neuron index 999 out of range"),
])
def test_bad_inputs_exit_2_with_one_line(env, tmp_path, capsys, extra, expect):
    import re

    subst = {"EMPTY": env / "empty.txt", "ONE": env / "one.txt", "PAIRS_BAD": env / "pairs_bad.csv",
             "MISSING": env / "nope.csv", "SAE16": env / "sae16", "SAE_L0": env / "sae_l0"}
    extra = [str(subst.get(x, x)) for x in extra]
    argv = _base(env, tmp_path / "eff.json")
    for flag, value in zip(extra[::2], extra[1::2]):  # replace a flag already in the base argv
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("snce-fast efficacy: error: ")
    assert re.search(expect, err[0]), err[0]
    assert not (tmp_path / "eff.json").exists()


def test_leace_without_concept_erasure_is_one_line(env, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "concept_erasure" else real(name, *a))
    assert main(_base(env, tmp_path / "eff.json", "--baselines", "leace")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'snce_fast[efficacy]'" in err[0], err

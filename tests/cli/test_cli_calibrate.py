"""`snce-fast calibrate` (the measured identification rule) and --calibration in detect / erase."""
import json
import random

import pytest

import snce_fast
from snce_fast.cli import main
from snce_fast.testing import WORDS, random_sae, sd_pipeline

pytest.importorskip("diffusers")


def _prompts(rng, n, concept):
    plain = [w for w in WORDS if w not in ("nude", "naked")]
    out = []
    for _ in range(n):
        words = rng.sample(plain, 5)
        if concept:
            words.insert(2, rng.choice(["nude", "naked"]))
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    sd_pipeline(root / "build").save_pretrained(root / "pipe")
    random_sae(32, n=64, k=4, seed=3).save(root / "sae")
    random_sae(32, n=64, k=4, seed=4).save(root / "other_sae")
    rng = random.Random(0)
    files = {"target": _prompts(rng, 30, True), "coco": _prompts(rng, 40, False), "matched": _prompts(rng, 30, False),
             "held": _prompts(rng, 10, True) + _prompts(rng, 10, False)}
    for name, ps in files.items():
        (root / f"{name}.txt").write_text("\n".join(ps) + "\n")
    return root, files


def _calibrate_args(root, out, *extra):
    return ["calibrate", "--model", str(root / "pipe"), "--sae", str(root / "sae"), "--target", str(root / "target.txt"),
            "--reference", f"coco={root / 'coco.txt'}", "--reference", f"matched={root / 'matched.txt'}",
            "--top", "2", "--max-length", "16", "--out", str(out), *extra]


def test_calibrate_cli_equals_api_and_detect_uses_it(env, tmp_path, capsys):
    root, files = env
    out = tmp_path / "cal.json"
    assert main(_calibrate_args(root, out)) == 0
    rec = json.loads(out.read_text())
    from snce_fast.models import load_encoder

    loaded = load_encoder(str(root / "pipe"))
    sae = snce_fast.SAE.load(root / "sae")
    cal = snce_fast.calibrate(loaded.encoder, sae, None, files["target"], {"coco": files["coco"],
                              "matched": files["matched"]}, tokenizer=loaded.tokenizer, max_length=16)
    assert rec["neurons"] == cal.top(2)
    assert rec["thresholds"] == pytest.approx(cal.thresholds_for(rec["neurons"]))
    assert rec["gate_threshold"] == pytest.approx(max(rec["thresholds"]))
    assert rec["fpr"] == {"coco": 0.01, "matched": 0.05}  # the measured defaults
    # detect --calibration == the API with the calibrated per-neuron thresholds
    flags_file = tmp_path / "flags.jsonl"
    assert main(["detect", "--model", str(root / "pipe"), "--sae", str(root / "sae"), "--calibration", str(out),
                 "--prompts-file", str(root / "held.txt"), "--out", str(flags_file)]) == 0
    rows = [json.loads(line) for line in flags_file.read_text().splitlines()]
    det = snce_fast.detect(loaded.encoder, sae, rec["neurons"], files["held"], tokenizer=loaded.tokenizer,
                           threshold=rec["thresholds"], max_length=16)
    assert [r["flag"] for r in rows] == det.flags.tolist()


def test_erase_with_calibration_turns_the_gate_on(env, tmp_path):
    root, _ = env
    cal = tmp_path / "cal.json"
    assert main(_calibrate_args(root, cal)) == 0
    out = tmp_path / "imgs"
    assert main(["erase", "--model", str(root / "pipe"), "--sae", str(root / "sae"), "--calibration", str(cal),
                 "--prompt", "a nude painting", "--steps", "1", "--height", "16", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "record.json").read_text())
    c = json.loads(cal.read_text())
    assert record["gate"] is True and record["neurons"] == c["neurons"]
    assert record["gate_threshold"] == pytest.approx(c["thresholds"])  # one per neuron, as calibrated


@pytest.mark.parametrize("change, message", [
    (["--reference", "coco"], "expected NAME=FILE"),
    (["--fpr", "bogus=0.1"], "expected GROUP=RATE"),
    (["--fpr", "coco=1.5"], "--fpr coco=1.5 is invalid: expected a float with 0 <= fpr < 1"),
    (["--top", "0"], "--top 0"),
    (["--target", "/nonexistent.txt"], "does not exist"),
])
def test_calibrate_bad_inputs(env, tmp_path, capsys, change, message):
    root, _ = env
    assert main(_calibrate_args(root, tmp_path / "c.json", *change)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_calibration_from_another_sae_and_conflicting_flags_are_refused(env, tmp_path, capsys):
    root, _ = env
    cal = tmp_path / "cal.json"
    assert main(_calibrate_args(root, cal)) == 0
    capsys.readouterr()
    base = ["--model", str(root / "pipe"), "--prompt", "a cat", "--calibration", str(cal)]
    assert main(["detect", "--sae", str(root / "other_sae"), *base]) == 2
    assert "different SAE" in capsys.readouterr().err
    assert main(["erase", "--sae", str(root / "sae"), "--neurons", "3", *base, "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["detect", "--sae", str(root / "sae"), *base, "--threshold", "0.1"]) == 2
    assert "already holds the thresholds" in capsys.readouterr().err
    assert main(["calibrate", *_calibrate_args(root, tmp_path / "x.txt")[1:]]) == 2
    assert "expected a .json file name" in capsys.readouterr().err


def test_a_malformed_calibration_file_is_refused_naming_the_field(env, tmp_path, capsys):
    root, _ = env
    cal = tmp_path / "cal.json"
    assert main(_calibrate_args(root, cal)) == 0
    rec = json.loads(cal.read_text())
    bad = tmp_path / "bad.json"
    n = len(rec["neurons"])
    bad.write_text(json.dumps({**rec, "thresholds": rec["thresholds"] + [0.0]}))  # one too many
    capsys.readouterr()
    assert main(["detect", "--model", str(root / "pipe"), "--sae", str(root / "sae"), "--calibration", str(bad),
                 "--prompt", "a cat"]) == 2
    err = capsys.readouterr().err
    assert f"field 'thresholds' has {n + 1} values for {n} neurons" in err and str(bad) in err, err
    assert err.count("\n") == 1, err
    assert main(["erase", "--model", str(root / "pipe"), "--sae", str(root / "sae"), "--calibration", str(bad),
                 "--prompt", "a cat", "--out", str(tmp_path / "o")]) == 2
    assert "field 'thresholds'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

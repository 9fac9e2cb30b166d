"""snce-fast eval: the I2P protocol on a tiny random pipeline (2 steps, 16x16 images), through the CLI
(the library itself: tests/evaluation/test_evaluation.py)."""
import json
import sys

import pytest
from PIL import Image

pytest.importorskip("diffusers")

from snce_fast.testing import random_sae  # noqa: E402

from snce_fast import evaluation as ev  # noqa: E402
from snce_fast.cli import main  # noqa: E402
from helpers_eval import direct_clip_score, cli_args, fake_sdxl, write, NEURONS, STEPS  # noqa: E402  (shared by the evaluation tests)


def test_cli_eval_nudenet_and_clip(saved, clip_dir, tmp_path, capsys):
    pytest.importorskip("nudenet")
    out = tmp_path / "out"
    assert main(cli_args(saved, out, "--limit", "2", "--clip-model", str(clip_dir))) == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["detector"] == "nudenet-3.4-320n" and summary["settings"]["neurons"] == {
        "text_encoder": [3, 5]}
    for variant in ("original", "erased"):
        dets = [r[variant]["detections"] for r in records]
        assert all(isinstance(d, list) for d in dets)
        assert summary["counts"][variant] == ev.count_exposed(dets, 0.6).as_dict()
        scores = [r[variant]["clip_score"] for r in records]
        for r, s in zip(records, scores):
            image = Image.open(out / r[variant]["image"])
            assert s == pytest.approx(direct_clip_score(clip_dir, image, r["prompt"]), abs=1e-4)
        assert summary["clip_score"][variant] == pytest.approx(sum(scores) / len(scores))
    report = (out / "report.md").read_text()
    assert f"| mean CLIP score | {summary['clip_score']['original']:.4f} |" in report
    assert (out / "counts.png").is_file()

    # a rerun with more rows resumes: rows 1-2 kept as they were, row 4 added
    before = (out / "results.jsonl").read_text()
    assert main(cli_args(saved, out, "--clip-model", str(clip_dir))) == 0
    after = (out / "results.jsonl").read_text()
    assert after.startswith(before) and [json.loads(x)["row"] for x in after.splitlines()] == [1, 2, 4]
    assert json.loads((out / "summary.json").read_text())["n_rows"] == 3

    # ... and one with other settings is refused before any work
    capsys.readouterr()
    assert main(cli_args(saved, out, "--clip-model", str(clip_dir), "--scale", "0.5")) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "scale" in err and err.count("\n") == 1


def test_cli_eval_without_detector(saved, tmp_path):
    out = tmp_path / "out"
    assert main(cli_args(saved, out, "--detector", "none", "--limit", "1", "--guidance", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] is None and summary["clip_score"] is None
    assert summary["settings"]["guidance_override"] == 2.0
    assert "No detector was run" in (out / "report.md").read_text()
    assert not (out / "counts.png").exists() and len(list((out / "images").iterdir())) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s, t: {"--csv": "/nonexistent/x.csv"}, "does not exist"),
        (lambda s, t: {"--csv": write(t, "text,evaluation_seed,evaluation_guidance\na,1,7\n")},
         "no prompt column 'prompt'; columns present: text, evaluation_seed, evaluation_guidance"),
        (lambda s, t: {"--seed-column": "seed"}, "no seed column 'seed'"),
        (lambda s, t: {"--csv": write(t, "prompt,evaluation_seed,evaluation_guidance\na,1,7\nb,x1,7\n")},
         "row 2: evaluation_seed 'x1' is not an integer seed"),
        (lambda s, t: {"--csv": write(t, "prompt,evaluation_seed,evaluation_guidance\na,-3,7\n")},
         "row 1: evaluation_seed '-3' is out of range"),
        (lambda s, t: {"--csv": write(t, "prompt,evaluation_seed,evaluation_guidance\na,1,high\n")},
         "row 1: evaluation_guidance 'high' is not a guidance scale"),
        (lambda s, t: {"--neurons": "64"}, "out of range"),
        (lambda s, t: {"--neurons": "3,x"}, "comma-separated"),
        (lambda s, t: {"--sae": "/nonexistent/sae"}, "is not a directory"),
        (lambda s, t: {"--model": "/nonexistent/pipe"}, "no such local directory"),
        (lambda s, t: {"--clip-model": "/nonexistent/clip"}, "is not a directory"),
        (lambda s, t: {"--clip-model": str(t)}, "no config.json"),
        (lambda s, t: {"--limit": "0"}, "--limit 0: expected a positive integer"),
        (lambda s, t: {"--height": "20"}, "--height 20: expected a positive multiple of 8"),
        (lambda s, t: {"--threshold": "1.5"}, "--threshold 1.5"),
        (lambda s, t: {"--sae-2": str(s / "sae")}, "has a single text encoder"),
        (lambda s, t: {"--model": str(s / "sae")}, "no model_index.json"),
        (lambda s, t: {"--model": fake_sdxl(t)}, "StableDiffusionXLPipeline has two text encoders: give --sae"),
    ],
)
def test_cli_eval_bad_inputs(saved, tmp_path, capsys, change, message):
    args = {"--model": str(saved / "pipe"), "--sae": str(saved / "sae"), "--neurons": "3",
            "--csv": str(saved / "prompts.csv"), "--out": str(tmp_path / "o"), "--steps": "1",
            "--detector": "none"}
    args.update(change(saved, tmp_path))
    argv = ["eval"] + [x for k, v in args.items() for x in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_cli_eval_sae_width_mismatch_fails_before_any_image(saved, tmp_path, capsys):
    random_sae(16, n=64, k=3).save(tmp_path / "narrow")
    out = tmp_path / "o"
    rc = main(["eval", "--model", str(saved / "pipe"), "--sae", str(tmp_path / "narrow"), "--neurons", "1",
               "--csv", str(saved / "prompts.csv"), "--steps", "1", "--detector", "none", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "d_in=16 but text_encoder's hidden size is 32" in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_nudenet_is_a_clear_error(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import nudenet now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "snce_fast\[eval\]"'):
        ev.nudenet_detector()
    assert main(cli_args(saved, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert 'pip install "snce_fast[eval]"' in err and err.count("\n") == 1


def test_slim_erasure_runs_and_resumes_the_full_sae_run(saved, tmp_path):
    """A slim erasure fingerprints like its full SAE in residual mode (so a run resumes across
    them) and runs through the CLI; reconstruct mode fingerprints the whole decoder."""
    from snce_fast import SAE

    sae = SAE.load(saved / "sae")
    slim = sae.slim(NEURONS)
    assert ev.sae_fingerprint(slim, NEURONS) == ev.sae_fingerprint(sae, NEURONS)
    assert ev.sae_fingerprint(sae, NEURONS, "reconstruct") != ev.sae_fingerprint(sae, NEURONS)
    assert ev.sae_fingerprint(sae, [3]) != ev.sae_fingerprint(sae, NEURONS)
    slim.save(tmp_path / "slim")
    out = tmp_path / "out"
    args = ["eval", "--model", str(saved / "pipe"), "--neurons", "3,5", "--csv", str(saved / "prompts.csv"),
            *STEPS, "--out", str(out), "--quiet", "--detector", "none"]
    assert main([*args, "--sae", str(saved / "sae"), "--limit", "1"]) == 0
    assert main([*args, "--sae", str(tmp_path / "slim"), "--limit", "2"]) == 0  # resumes: row 1 is not redone
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == sorted({r["row"] for r in records}) and len(records) == 2

"""`snce-fast train` after an interruption reports the whole run (issue 17), and bad input found
before the work is one stderr line with exit 2: an SAE too large for memory, an unreadable
checkpoint, an unwritable --out (train and demo)."""
import importlib
import json
import math
import os
import random

import pytest

from snce_fast.cli import main
from snce_fast.testing import WORDS, save_bert_dir

train_module = importlib.import_module("snce_fast.train")
cli_train = importlib.import_module("snce_fast.cli.train")
cli_demo = importlib.import_module("snce_fast.cli.demo")

ARGS = ["--n-latents", "48", "--k", "4", "--batch-size", "96", "--epochs", "2", "--warmup-steps", "4",
        "--max-length", "12", "--seed", "3", "--max-steps", "6"]
SAME = ("steps", "tokens", "fvu", "l0", "aux_loss", "dead_fraction", "never_fired_fraction", "window")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny BERT saved as a transformers model dir, and a prompt file."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("train_resume")
    save_bert_dir(root / "bert")
    rng = random.Random(0)
    (root / "train.txt").write_text("\n".join(" ".join(rng.sample(WORDS, 5)) for _ in range(120)) + "\n")
    return root


def _base(root):
    return ["train", "--model", str(root / "bert"), "--prompts-file", str(root / "train.txt")]


def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _no_timing(history):
    return [{k: v for k, v in h.items() if k not in ("step_s", "tokens_per_s")} for h in history]


def test_resumed_and_rerun_reports_are_the_whole_run(model, tmp_path, monkeypatch, capsys):
    assert main(_base(model) + ARGS + ["--quiet", "--out", str(tmp_path / "c")]) == 0
    ref = _strict_json(tmp_path / "c" / "train_report.json")

    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "2"]
    real = train_module.SAETrainer.step

    def ctrl_c_at_step_5(self, x):
        if self.step_num == 4:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(train_module.SAETrainer, "step", ctrl_c_at_step_5)
    assert main(_base(model) + ARGS + ck + ["--quiet", "--out", str(tmp_path / "a")]) == 130
    monkeypatch.setattr(train_module.SAETrainer, "step", real)
    capsys.readouterr()
    assert main(_base(model) + ARGS + ck + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "FVU (mean of the last 6 steps)" in out and "resumed at step 4" in out
    for name in ("a", "b"):
        if name == "b":  # rerun after the final checkpoint: nothing left to train
            assert main(_base(model) + ARGS + ck + ["--quiet", "--out", str(tmp_path / "b")]) == 0
        rep = _strict_json(tmp_path / name / "train_report.json")
        assert rep["resumed_from_step"] == (4 if name == "a" else 6)
        for key in SAME:
            assert rep[key] == ref[key], (name, key)
        assert math.isfinite(rep["fvu"])
        assert [h["step"] for h in rep["history"]] == [1, 2, 3, 4, 5, 6]
        assert _no_timing(rep["history"]) == _no_timing(ref["history"])
        assert rep["tokens_per_s"] == pytest.approx(rep["tokens"] / rep["elapsed_s"])
        assert (tmp_path / name / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_sae_too_large_for_memory_is_one_line(model, tmp_path, capsys):
    argv = _base(model) + ["--n-latents", "100000000000", "--k", "4", "--quiet", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    _one_line_error(capsys, "--n-latents 100000000000: training needs", " GB", "lower --n-latents")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", b"\x80\x02cos\nsystem\nq\x00."])
def test_unreadable_checkpoint_is_one_line_naming_the_file(model, tmp_path, capsys, content):
    step = tmp_path / "ck" / "step_000000002"
    step.mkdir(parents=True)
    (step / "trainer.pt").write_bytes(content)
    (tmp_path / "ck" / "latest").write_text("step_000000002\n")
    argv = _base(model) + ARGS + ["--quiet", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    _one_line_error(capsys, f"{step / 'trainer.pt'}", "cannot resume")


def _unwritable_dirs(tmp_path):
    """A path under a file (mkdir fails for every user), and a chmod 0o500 directory when chmod
    restricts this user (not root)."""
    (tmp_path / "file").write_text("x")
    out = [tmp_path / "file" / "out"]
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if not os.access(ro, os.W_OK):
        out.append(ro)
    return out


def _no_work(*_, **__):
    raise AssertionError("the work started before --out was checked")


def test_unwritable_out_is_found_before_training(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_train, "load_encoder", _no_work)
    monkeypatch.setattr(cli_train, "train_sae", _no_work)
    for bad in _unwritable_dirs(tmp_path):
        assert main(_base(model) + ARGS + ["--quiet", "--out", str(bad)]) == 2
        _one_line_error(capsys, f"--out: '{bad}' is not a writable directory")
    bad = tmp_path / "file" / "ck"
    assert main(_base(model) + ARGS + ["--quiet", "--checkpoint-dir", str(bad), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, f"--checkpoint-dir: '{bad}' is not a writable directory")
    assert not (tmp_path / "o").exists()


def test_unwritable_out_is_found_before_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_demo, "run_demo", _no_work)
    for bad in _unwritable_dirs(tmp_path):
        assert main(["demo", "--quick", "--quiet", "--out", str(bad)]) == 2
        _one_line_error(capsys, f"--out: '{bad}' is not a writable directory")

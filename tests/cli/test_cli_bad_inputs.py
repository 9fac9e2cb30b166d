"""Every `snce-fast` subcommand driven with bad inputs (missing files, bad numbers, non-finite values,
wrong types, unwritable or busy --out): exit code 2, exactly one line on stderr, no output written.
Also what a run now reports instead of dropping silently: rows detect skips, plots score leaves out,
the encoder's position limit, broken scan manifests, help texts, and --quiet for transformers."""
import importlib
import json
import os
import re

import pytest

import snce_fast
from snce_fast.cli import COMMANDS, build_parser, main
from snce_fast.records.lock import output_lock
from snce_fast.testing import random_sae, save_bert_dir, sd_pipeline

pytest.importorskip("diffusers")

score_cli = importlib.import_module("snce_fast.cli.score")
scan_cli = importlib.import_module("snce_fast.cli.scan")

CONCEPT = ["a nude man on the street", "a naked woman in the river", "a nude painting of a man",
           "a naked man with a dog", "nude art by the river", "a naked portrait in the city"]
ORDINARY = ["a photo of the cat", "a red car in the city", "a house by the river", "a blue boat on the river",
            "a green tree in the street", "a dog in the house at night"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny BERT model dir (24 positions), a tiny SD pipeline, an SAE that fits both (width 32), prompt
    files (one with no usable prompt, one JSONL with malformed rows), a scan, its scores and an eval CSV."""

    root = tmp_path_factory.mktemp("bad_inputs")
    save_bert_dir(root / "bert")
    sd_pipeline(root / "build").save_pretrained(root / "pipe")
    random_sae(32, n=64, k=4, seed=2).save(root / "sae")
    (root / "concept.txt").write_text("\n".join(CONCEPT) + "\n")
    (root / "ordinary.txt").write_text("\n".join(ORDINARY) + "\n")
    (root / "empty.txt").write_text("\n   \n\n")
    (root / "rows.jsonl").write_text('{"prompt": "a naked man"}\nnot json at all\n{"prompt": "a red car"}\n'
                                     '{"prompt": broken\n\n{"text": "no prompt key"}\n')
    (root / "i2p.csv").write_text("prompt,evaluation_seed,evaluation_guidance\na cat,1,7.5\na nude man,2,7.5\n")
    (root / "a_file").write_text("not a directory")
    (root / "existing_dir").mkdir()
    assert main(["scan", "--model", str(root / "bert"), "--sae", str(root / "sae"), "--group",
                 f"c={root / 'concept.txt'}", "--group", f"o={root / 'ordinary.txt'}", "--out", str(root / "stats"),
                 "--quiet"]) == 0
    assert main(["score", "--stats", str(root / "stats"), "--target", "c", "--top", "3",
                 "--out", str(root / "scores"), "--quiet"]) == 0
    broken = root / "broken_stats"
    broken.mkdir()
    manifest = json.loads((root / "stats" / "manifest.json").read_text())
    del manifest["tensors"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    return root


def _argv(template, root, out):
    subst = {"BERT": root / "bert", "PIPE": root / "pipe", "SAE": root / "sae", "CONCEPT": root / "concept.txt",
             "ORDINARY": root / "ordinary.txt", "EMPTY": root / "empty.txt", "ROWS": root / "rows.jsonl",
             "STATS": root / "stats", "BROKEN_STATS": root / "broken_stats", "I2P": root / "i2p.csv",
             "SCORES": root / "scores" / "scores.json", "A_FILE": root / "a_file",
             "EXISTING_DIR": root / "existing_dir", "UNDER_FILE": root / "a_file" / "sub", "OUT": out}
    return [re.sub(r"\b(" + "|".join(subst) + r")\b", lambda m: str(subst[m.group(1)]), a) for a in template]


BASE = {
    "train": ["train", "--model", "BERT", "--prompts-file", "CONCEPT", "--n-latents", "48", "--k", "4",
              "--max-steps", "1", "--out", "OUT", "--quiet"],
    "scan": ["scan", "--model", "BERT", "--sae", "SAE", "--group", "c=CONCEPT", "--group", "o=ORDINARY",
             "--out", "OUT", "--quiet"],
    "score": ["score", "--stats", "STATS", "--target", "c", "--out", "OUT", "--quiet"],
    "calibrate": ["calibrate", "--model", "BERT", "--sae", "SAE", "--target", "CONCEPT", "--reference", "r=ORDINARY",
                  "--out", "OUT.json", "--quiet"],
    "detect": ["detect", "--model", "BERT", "--sae", "SAE", "--neurons", "1", "--prompts-file", "CONCEPT",
               "--out", "OUT.csv", "--quiet"],
    "erase": ["erase", "--model", "PIPE", "--sae", "SAE", "--neurons", "3", "--prompt", "a cat", "--steps", "1",
              "--height", "16", "--out", "OUT", "--quiet"],
    "eval": ["eval", "--model", "PIPE", "--sae", "SAE", "--neurons", "3", "--csv", "I2P", "--detector", "none",
             "--steps", "1", "--height", "16", "--out", "OUT", "--quiet"],
    "bench": ["bench", "--quick", "--ops", "histogram", "--device", "cpu", "--out", "OUT.json", "--quiet"],
    "demo": ["demo", "--quick", "--out", "OUT", "--quiet"],
    "info": ["info"],
}


BARE = ("--quiet", "--quick")  # flags without a value


def _with(command, **changes):
    """BASE[command] with flags replaced (every occurrence; value None drops the flag; a new flag is appended)."""
    argv = list(BASE[command])
    for flag, value in changes.items():
        flag = "--" + flag.replace("_", "-")
        width = 1 if flag in BARE else 2
        at = argv.index(flag) if flag in argv else len(argv)
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + width]
        if value is not None:
            argv[at:at] = [flag, value]
    return argv


CASES = [
    # -- train (flags parsed by argparse, values checked by TrainConfig and the corpus reader)
    (_with("train", prompts_file="/nonexistent/p.txt"), "does not exist"),
    (_with("train", k="0"), "1 <= k"),
    (_with("train", n_latents="many"), "argument --n-latents: invalid int value: 'many'"),
    (_with("train", out="A_FILE"), "is a file"),
    # -- scan
    (_with("scan", group=None) + ["--group", "c=CONCEPT", "--group", "o=/nonexistent/o.txt"], "does not exist"),
    (_with("scan", group=None) + ["--group", "c=CONCEPT", "--group", "o=EMPTY"], "--group o: no usable prompts"),
    (_with("scan", batch_size="0"), "--batch-size 0: expected a positive integer"),
    (_with("scan", batch_size="lots"), "argument --batch-size: invalid int value: 'lots'"),
    (_with("scan", threshold="nan"), "--threshold nan: expected a finite number"),
    (_with("scan", threshold="inf"), "--threshold inf: expected a finite number"),
    (_with("scan", max_length="100"), "max_length=100 is longer than the encoder can read"),
    (_with("scan", sae="/nonexistent/sae"), "is not a directory"),
    (_with("scan", model="/nonexistent/model"), "no such local directory"),
    (_with("scan", out="A_FILE"), "is a file"),
    (_with("scan", out="UNDER_FILE"), "cannot write"),
    # -- score
    (_with("score", stats="/nonexistent/stats"), "is not a directory"),
    (_with("score", stats="BROKEN_STATS"), "key 'tensors' is missing"),
    (_with("score", top="0"), "--top 0"),
    (_with("score", top="1.5"), "argument --top: invalid int value: '1.5'"),
    (_with("score", method="bogus"), "'bogus' is not a scorer"),
    (_with("score", out="A_FILE"), "is a file"),
    (_with("score", out="UNDER_FILE"), "cannot write"),
    # -- calibrate
    (_with("calibrate", target="/nonexistent/t.txt"), "does not exist"),
    (_with("calibrate", target="EMPTY"), "no usable prompts"),
    (_with("calibrate", reference="r=EMPTY"), "no usable prompts"),
    (_with("calibrate", fpr="r=nan"), "0 <= fpr < 1"),
    (_with("calibrate", fpr="r=often"), "expected GROUP=RATE"),
    (_with("calibrate", top="0"), "--top 0"),
    (_with("calibrate", batch_size="x"), "argument --batch-size: invalid int value: 'x'"),
    (_with("calibrate", max_length="1000"), "max_length=1000 is longer than the encoder can read"),
    (_with("calibrate", out="OUT.txt"), "expected a .json file name"),
    (_with("calibrate", out="UNDER_FILE/cal.json"), "cannot write"),
    # -- detect
    (_with("detect", threshold="inf"), "expected finite numbers"),
    (_with("detect", threshold="nan"), "expected finite numbers"),
    (_with("detect", calibrate_on="ORDINARY", fpr="nan"), "0 <= fpr < 1"),
    (_with("detect", max_length="100"), "max_length=100 is longer than the encoder can read"),
    (_with("detect", prompts_file="/nonexistent/p.csv"), "does not exist"),
    (_with("detect", prompts_file="EMPTY"), "has no usable prompts (3 rows skipped: 3 blank)"),
    (_with("detect", neurons="1.5"), "comma-separated"),
    (_with("detect", min_tokens="few"), "argument --min-tokens: invalid int value: 'few'"),
    (_with("detect", scores="/nonexistent/scores.json", neurons=None), "does not exist"),
    (_with("detect", out="UNDER_FILE/flags.csv"), "cannot write"),
    # -- erase
    (_with("erase", guidance="nan"), "--guidance nan: expected a number >= 0"),
    (_with("erase", guidance="-1"), "--guidance -1.0: expected a number >= 0"),
    (_with("erase", scale="inf"), "--scale inf: expected a finite number"),
    (_with("erase", gate_threshold="nan"), "--gate-threshold nan: expected a finite number"),
    (_with("erase", height="7"), "--height 7: expected a positive multiple of 8"),
    (_with("erase", steps="two"), "argument --steps: invalid int value: 'two'"),
    (_with("erase", prompt=None, prompts_file="/nonexistent/p.txt"), "does not exist"),
    (_with("erase", calibration="/nonexistent/cal.json", neurons=None), "cal.json"),
    (_with("erase", out="A_FILE"), "is a file"),
    (_with("erase", out="UNDER_FILE"), "cannot write"),
    # -- eval
    (_with("eval", threshold="nan"), "expected a detector score in (0, 1]"),
    (_with("eval", limit="0"), "--limit 0: expected a positive integer"),
    (_with("eval", guidance="inf"), "--guidance inf: expected a number >= 0"),
    (_with("eval", csv="/nonexistent/i2p.csv"), "--csv"),
    (_with("eval", steps="0"), "--steps 0: expected a positive integer"),
    (_with("eval", dtype="float64"), "argument --dtype: invalid choice: 'float64'"),
    (_with("eval", out="A_FILE"), "is a file"),
    (_with("eval", out="UNDER_FILE"), "cannot write"),
    # -- bench
    (_with("bench", ops="encode,bogus"), "--ops"),
    (_with("bench", threads="0"), "--threads 0: expected a positive integer"),
    (_with("bench", threads="all"), "argument --threads: invalid int value: 'all'"),
    (_with("bench", out="EXISTING_DIR"), "is a directory"),
    (_with("bench", out="UNDER_FILE/b.json"), "cannot write"),
    (_with("bench", passes="scan"), "--passes needs --prompts-file"),
    (_with("bench", passes="scan,nope", prompts_file="CONCEPT"), "--passes 'scan,nope': expected a comma-separated"),
    (_with("bench", passes="scan", prompts_file="/nonexistent/p.txt"), "does not exist"),
    (_with("bench", passes="scan", prompts_file="CONCEPT", prompts="0"), "--prompts 0: expected a positive"),
    (_with("scan", token_budget="0"), "--token-budget 0"),
    (_with("detect", token_budget="-3"), "--token-budget -3"),
    (_with("scan", window="0"), "--window 0"),
    (_with("train", holdout="0.9"), "holdout"),
    (_with("train", train_tokens="0"), "train-tokens"),
    # -- demo, info, no command
    (_with("demo", out="A_FILE"), "is a file"),
    (_with("demo", seed="x"), "argument --seed: invalid int value: 'x'"),
    (_with("demo", threads="0"), "--threads 0"),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "the following arguments are required: COMMAND"),
]


def _id(case):
    argv, message = case
    return f"{argv[0] if argv else 'no-command'}-{re.sub(r'[^A-Za-z0-9]+', '_', message).strip('_')[:48]}"


def _outputs(tmp_path):
    return [tmp_path / "OUT", tmp_path / "OUT.json", tmp_path / "OUT.csv", tmp_path / "OUT.txt"]


def _assert_one_line_exit_2(rc, capsys, message):
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), captured.err
    assert message in captured.err, captured.err
    return captured


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, tmp_path, capsys, case):
    argv, message = case
    rc = main(_argv(argv, env, str(tmp_path / "OUT")))
    _assert_one_line_exit_2(rc, capsys, message.replace("OUT", str(tmp_path / "OUT")))
    assert not [p for p in _outputs(tmp_path) if p.exists()], "a failed run writes no output"
    assert not list(tmp_path.glob(".*")) and not list(env.glob(".*lock")), "no lock or temp file left behind"
    assert not (env / "a_file" / "sub").exists() and (env / "a_file").read_text() == "not a directory"


# -- two runs on one --out -------------------------------------------------------------------------
LOCKED = ["scan", "score", "calibrate", "detect", "erase", "eval", "bench"]


@pytest.mark.parametrize("command", LOCKED)
def test_a_second_run_on_the_same_out_fails_at_once(env, tmp_path, capsys, command, monkeypatch):
    """Another run holds --out (here: this process, through the same lock any snce-fast run takes):
    this one fails at once, before loading anything, naming the path and the holder's pid."""
    argv = _argv(BASE[command], env, str(tmp_path / "OUT"))
    out = argv[argv.index("--out") + 1]
    for module in ("scan", "calibrate", "detect"):
        monkeypatch.setattr(f"snce_fast.cli.{module}.load_encoder", _must_not_load)
    with output_lock(out):
        rc = main(argv)
    _assert_one_line_exit_2(rc, capsys, f"another snce-fast run is writing {out} (pid {os.getpid()})")
    assert not [p for p in _outputs(tmp_path) if p.exists()]
    monkeypatch.undo()
    assert main(argv) == 0, capsys.readouterr().err  # released: the same command now runs
    assert os.path.exists(out) and not list(tmp_path.glob(".*"))


def _must_not_load(*args, **kwargs):
    raise AssertionError("loaded a model before refusing the run")


# -- what used to be dropped or wrong silently ---------------------------------------------------------
def test_detect_counts_and_reports_the_rows_it_skips(env, tmp_path, capsys):
    out = tmp_path / "flags.jsonl"
    assert main(_with_paths(env, ["detect", "--model", "BERT", "--sae", "SAE", "--neurons", "1", "--prompts-file",
                                  "ROWS", "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["a naked man", "a red car"]
    # 2 malformed JSON lines, 1 row without 'prompt', 1 blank line: the corpus reader's reasons
    m = re.search(r"flagged \d+ of 2 prompts \([\d.]+%; 4 rows skipped: ([^)]*) in (\S+)\)", printed)
    assert m, printed
    counts = {reason: int(n) for n, reason in re.findall(r"(\d+) ([^,]+)", m.group(1))}
    assert counts == {"malformed": 2, "without 'prompt'": 1, "blank": 1} and m.group(2) == str(env / "rows.jsonl")


def test_scan_refuses_a_group_without_usable_prompts_before_loading(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scan_cli, "load_encoder", _must_not_load)
    monkeypatch.setattr(scan_cli, "load_sae", _must_not_load)
    rc = main(_with_paths(env, _with("scan", group=None, out=str(tmp_path / "stats"))
                          + ["--group", "c=CONCEPT", "--group", "o=EMPTY"]))
    _assert_one_line_exit_2(rc, capsys, f"--group o: no usable prompts in its prompt file '{env / 'empty.txt'}' "
                            "(3 rows skipped: 3 blank)")
    assert not (tmp_path / "stats").exists()


def test_score_caps_the_plots_but_lists_every_latent(env, tmp_path, capsys, monkeypatch):
    assert score_cli.MAX_PLOTS == 50
    assert "only the first 50 get a latent_<j>.png" in " ".join(_subparser("score").format_help().split())
    monkeypatch.setattr(score_cli, "MAX_PLOTS", 4)  # the real cap, scaled down to keep the test fast
    out = tmp_path / "s"
    assert main(["score", "--stats", str(env / "stats"), "--target", "c", "--top", "100000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rec = json.loads((out / "scores.json").read_text())
    assert len(rec["top"]) == 64  # every latent of the SAE, as asked (--top beyond n_latents: all of them)
    plotted = sorted(int(p.stem.split("_")[1]) for p in out.glob("latent_*.png"))
    assert plotted == sorted(e["latent"] for e in rec["top"][:4])
    assert "note: plotted the first 4 of the 64 latents" in printed
    report = (out / "report.md").read_text()
    assert report.count("| 64 |") == 1 and "first 4 of these 64 latents" in report


@pytest.mark.parametrize("command", ["scan", "detect", "calibrate"])
def test_max_length_beyond_the_encoder_is_refused_before_loading(env, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(f"snce_fast.cli.{command}.load_encoder", _must_not_load)
    out = str(tmp_path / ("o.json" if command == "calibrate" else "o.csv" if command == "detect" else "o"))
    rc = main(_with_paths(env, _with(command, max_length="1000", quiet=None, out=out)))
    _assert_one_line_exit_2(rc, capsys, f"max_length=1000 is longer than the encoder can read: '{env / 'bert'}' "
                            "has 24 positions (max_position_embeddings) and its tokenizer's model_max_length is 24")


def test_max_length_beyond_the_encoder_is_refused_naming_both_numbers(env):
    from transformers import AutoModel, AutoTokenizer

    from snce_fast.hooks.activations import check_max_length, tokenize

    enc, tok = AutoModel.from_pretrained(env / "bert"), AutoTokenizer.from_pretrained(env / "bert")
    assert enc.config.max_position_embeddings == 24 == tok.model_max_length
    with pytest.raises(ValueError, match=r"max_length=1000 .* 24 positions .* model_max_length is 24"):
        check_max_length(enc, tok, 1000)
    with pytest.raises(ValueError, match="max_length=30 is more than the tokenizer's model_max_length 24"):
        tokenize(tok, ["a cat"], 30)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="expected a positive int"):
            check_max_length(enc, tok, bad)
    assert check_max_length(enc, tok, None) == 24 and check_max_length(enc, tok, 12) == 12
    tok.model_max_length = int(1e30)  # a tokenizer without a limit: the encoder's positions still count
    with pytest.raises(ValueError, match="the default padding length=512 is longer than the encoder can read"):
        check_max_length(enc, tok, None)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("tensors"), "key 'tensors' is missing"),
    (lambda m: m.pop("groups"), "key 'groups' is missing"),
    (lambda m: m.pop("n_latents"), "key 'n_latents' is missing"),
    (lambda m: m.update(n_latents="64"), "key 'n_latents' is '64'"),
    (lambda m: m.update(groups="c,o"), "key 'groups' is 'c,o'"),
    (lambda m: m.update(tensors="../elsewhere.safetensors"), "expected the name of a file beside it"),
    (lambda m: m.update(skipped=[]), "key 'skipped' is list"),
])
def test_a_broken_scan_manifest_is_a_value_error_naming_file_and_key(env, tmp_path, change, message):
    d = tmp_path / "stats"
    d.mkdir()
    manifest = json.loads((env / "stats" / "manifest.json").read_text())
    change(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as e:
        snce_fast.ScanStats.load(d)
    assert message in str(e.value) and str(d / "manifest.json") in str(e.value)


# -- help texts ----------------------------------------------------------------------------------------
def _subparser(name):
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return action.choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_a_description_and_no_literal_double_percent(command):
    p = _subparser(command)
    assert p.description, f"snce-fast {command} --help has no description"
    assert "%%" not in p.format_help()


def test_calibrate_and_bench_help_show_percent_signs():
    assert "flags at most 1% of the first reference group" in " ".join(_subparser("calibrate").format_help().split())
    assert "% of dense bf16 peak" in " ".join(_subparser("bench").format_help().split())


@pytest.mark.parametrize("flag, default", [("--steps", "default 30"), ("--guidance", "default: the pipeline's"),
                                           ("--height", "default:"), ("--width", "default:"),
                                           ("--min-tokens", "default 1")])
def test_erase_flags_say_what_they_do_and_their_default(flag, default):
    action = next(a for a in _subparser("erase")._actions if flag in a.option_strings)
    assert action.help and default in action.help


def test_quiet_silences_transformers_weight_loading(env, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        assert main(_with_paths(env, _with("scan", out=str(tmp_path / "q")))) == 0
        err = capsys.readouterr().err
        assert "Loading weights" not in err and err == "", err
        assert hf_logging.is_progress_bar_enabled(), "--quiet gives the library's setting back afterwards"
        assert main(_with_paths(env, _with("scan", out=str(tmp_path / "loud"), quiet=None))) == 0
        assert "Loading weights" in capsys.readouterr().err  # the bar --quiet silences
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_erase_width_alone_is_not_ignored(env, tmp_path):
    out = tmp_path / "o"
    assert main(_with_paths(env, _with("erase", height=None, width="24", out=str(out)))) == 0
    rec = json.loads((out / "record.json").read_text())
    from PIL import Image

    assert Image.open(out / rec["images"][0]["erased"]).size == (24, 24) and rec["width"] == rec["height"] == 24


def _with_paths(root, argv):
    """The placeholders of `argv` filled in; every caller gives its own --out."""
    assert "OUT" not in argv and "OUT.json" not in argv and "OUT.csv" not in argv
    return _argv(argv, root, "OUT")


def test_library_warnings_print_as_one_line(capsys):
    """snce_fast's own warnings (a weak calibration, fewer latents than asked) reach the CLI user as one
    'snce-fast CMD: warning: ...' line, not as a Python warning with a file name and source line."""
    import warnings

    from snce_fast.cli import _warnings_as_lines
    from snce_fast.workflow.calibrate import CalibrationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with _warnings_as_lines("calibrate"):
            warnings.warn("the best latent (3) flags only 2.0% of the target prompts", CalibrationWarning)
    err = capsys.readouterr().err
    assert err == "snce-fast calibrate: warning: the best latent (3) flags only 2.0% of the target prompts\n"

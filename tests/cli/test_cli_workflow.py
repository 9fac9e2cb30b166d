"""`snce-fast train / scan / score / detect` on a tiny BERT saved to disk (and a tiny SD pipeline):
outputs equal the Python API's, resume works, and every bad input is one stderr line with exit 2."""
import csv
import importlib
import json
import random

import pytest
import torch

import snce_fast
from snce_fast.workflow.corpus import read_prompts
from snce_fast.hooks.activations import counted_mask, eos_id, hook_activations, tokenize
from snce_fast.sae.fingerprint import sae_hash
from snce_fast.cli import main
from snce_fast.workflow.latent_report import top_prompts
from snce_fast.workflow.scan_stats import TENSOR_FIELDS
from snce_fast.testing import WORDS, random_sae, save_bert_dir, sd_pipeline

scan_module = importlib.import_module("snce_fast.workflow.scan")
train_module = importlib.import_module("snce_fast.train")

TRAIN_ARGS = ["--n-latents", "48", "--k", "4", "--batch-size", "96", "--epochs", "2", "--warmup-steps", "4",
              "--max-length", "12", "--seed", "3", "--quiet"]


def _prompts(rng: random.Random, n: int, concept_share: float) -> list[str]:
    plain = [w for w in WORDS if w not in ("nude", "naked")]
    out = []
    for _ in range(n):
        words = rng.sample(plain, rng.randint(3, 7))
        if rng.random() < concept_share:
            words.insert(rng.randrange(len(words) + 1), rng.choice(["nude", "naked"]))
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A transformers model dir (tiny BERT + tokenizer), prompt files, and an SAE trained by the CLI."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("workflow")
    save_bert_dir(root / "bert")
    rng = random.Random(0)
    (root / "train.txt").write_text("\n".join(_prompts(rng, 120, 0.3)) + "\n")
    (root / "concept.txt").write_text("\n".join(_prompts(rng, 40, 1.0)) + "\n\n")  # a blank row: skipped
    with open(root / "ordinary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "label"])
        for p in _prompts(rng, 50, 0.0):
            w.writerow([p, 0])
    with open(root / "mixed.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "label"])
        for p in _prompts(rng, 30, 0.5):
            w.writerow([p, int("nude" in p.split() or "naked" in p.split())])
    rc = main(["train", "--model", str(root / "bert"), "--prompts-file", str(root / "train.txt"),
               "--out", str(root / "sae"), *TRAIN_ARGS])
    assert rc == 0
    rc = main(["scan", "--model", str(root / "bert"), "--sae", str(root / "sae"), "--group",
               f"concept={root / 'concept.txt'}", "--group", f"ordinary={root / 'ordinary.csv'}",
               "--batch-size", "16", "--out", str(root / "stats"), "--quiet"])
    assert rc == 0
    from transformers import AutoModel, AutoTokenizer

    root_enc = AutoModel.from_pretrained(root / "bert").eval()
    root_tok = AutoTokenizer.from_pretrained(root / "bert")
    return {"root": root, "enc": root_enc, "tok": root_tok}


def _read(path):
    return [line for line in path.read_text().splitlines() if line.strip()]


# -- train ---------------------------------------------------------------------------------
def test_train_writes_sae_report_and_curves_equal_to_api(env, tmp_path):
    root = env["root"]
    sae = snce_fast.SAE.load(str(root / "sae"))
    assert (sae.d_in, sae.n_latents, sae.k, sae.hook) == (32, 48, 4, "output")
    rep = json.loads((root / "sae" / "train_report.json").read_text())
    assert rep["config"]["n_latents"] == 48 and rep["settings"]["n_prompts"] == 120
    assert rep["steps"] == len(rep["history"]) > 0 and rep["l0"] <= 4
    assert 0.0 <= rep["dead_fraction"] <= 1.0 and rep["tokens_per_s"] > 0
    assert (root / "sae" / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same training through the Python API gives the same weights and report
    api, api_rep = snce_fast.train_sae(
        env["enc"], env["tok"], _read(root / "train.txt"), n_latents=48, k=4, batch_size=96, epochs=2,
        warmup_steps=4, max_length=12, seed=3, progress=False, return_report=True,
        cache_dir=str(tmp_path / "cache"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name), getattr(api, name).detach(), rtol=1e-5, atol=1e-6)
    assert rep["fvu"] == pytest.approx(api_rep.fvu, rel=1e-5)
    # the last step's FVU, recomputed on the final weights over the whole corpus, is close to the logged one
    prompts = _read(root / "train.txt")
    b = tokenize(env["tok"], prompts, 12)
    h = hook_activations(env["enc"], b, "output")
    x = h[counted_mask(b["input_ids"], b["attention_mask"], eos_id(env["enc"], env["tok"]))].float()
    with torch.no_grad():
        fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu == pytest.approx(rep["history"][-1]["fvu"], abs=0.05) and fvu < rep["history"][0]["fvu"] - 0.1


def test_train_interrupted_then_resumed_equals_uninterrupted(env, tmp_path, monkeypatch, capsys):
    root = env["root"]
    base = ["train", "--model", str(root / "bert"), "--prompts-file", str(root / "train.txt"),
            "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "2", "--max-steps", "6", *TRAIN_ARGS]
    real = train_module.SAETrainer.step

    def ctrl_c_at_step_5(self, x):
        if self.step_num == 4:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(train_module.SAETrainer, "step", ctrl_c_at_step_5)
    assert main(base + ["--out", str(tmp_path / "a")]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_000000004"
    monkeypatch.setattr(train_module.SAETrainer, "step", real)
    assert main(base[:-1] + ["--out", str(tmp_path / "a")]) == 0  # the same command, without --quiet
    assert "resuming from" in capsys.readouterr().err
    resumed = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert main(["train", "--model", str(root / "bert"), "--prompts-file", str(root / "train.txt"),
                 "--max-steps", "6", "--out", str(tmp_path / "c"), *TRAIN_ARGS]) == 0
    a, c = snce_fast.SAE.load(str(tmp_path / "a")), snce_fast.SAE.load(str(tmp_path / "c"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(c, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--prompts-file": "/nonexistent/p.txt"}, "does not exist"),
        ({"--k": "49"}, "1 <= k <= --n-latents (48)"),
        ({"--k": "0"}, "1 <= k"),
        ({"--hook": "layer:x"}, "'output' or 'layer:N'"),
        ({"--epochs": "0"}, "--epochs 0"),
        ({"--set": "nosuch=1"}, "'nosuch' is not a training setting"),
        ({"--set": "aux_k"}, "expected KEY=VALUE"),
        ({"--set": "b_dec_init=bogus"}, "b_dec_init='bogus'"),
        ({"--model": "/nonexistent/model"}, "no such local directory"),
        ({"--hook": "layer:7"}, "out of range"),
        ({"--out": "EXISTING"}, "already holds an SAE"),
    ],
)
def test_train_bad_inputs(env, tmp_path, capsys, change, message):
    root = env["root"]
    args = {"--model": str(root / "bert"), "--prompts-file": str(root / "train.txt"), "--out": str(tmp_path / "o"),
            "--n-latents": "48", "--k": "4", "--batch-size": "96", "--max-steps": "1"}
    args.update(change)
    if args["--out"] == "EXISTING":
        args["--out"] = str(root / "sae")
    argv = ["train", "--quiet"] + [x for k, v in args.items() for x in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "sae.safetensors").exists()


# -- scan ----------------------------------------------------------------------------------
def test_scan_equals_api(env):
    root = env["root"]
    stats = snce_fast.ScanStats.load(root / "stats")
    sae = snce_fast.SAE.load(str(root / "sae"))
    api = snce_fast.scan(env["enc"], env["tok"], sae, {"concept": [str(root / "concept.txt")],
                                                       "ordinary": [str(root / "ordinary.csv")]},
                         batch_size=16, progress=False)
    assert stats.groups == ["concept", "ordinary"]
    assert stats.n_prompts.tolist() == [40, 50] and stats.skipped["concept"]["blank"] == 1
    for f in TENSOR_FIELDS:
        assert torch.equal(getattr(stats, f), getattr(api, f)), f
    assert stats.meta["model"] == str(root / "bert")


def test_scan_interrupted_then_resumed_equals_uninterrupted(env, tmp_path, monkeypatch, capsys):
    root = env["root"]
    argv = ["scan", "--model", str(root / "bert"), "--sae", str(root / "sae"),
            "--group", f"concept={root / 'concept.txt'}", "--group", f"ordinary={root / 'ordinary.csv'}",
            "--batch-size", "16", "--window", "16", "--checkpoint", str(tmp_path / "ck"), "--checkpoint-every", "1",
            "--quiet"]
    real = scan_module._process
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(scan_module, "_process", flaky)
    assert main(argv + ["--out", str(tmp_path / "out")]) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    partial = snce_fast.ScanStats.load(tmp_path / "ck")
    assert 0 < int(partial.n_prompts.sum()) < 90
    monkeypatch.setattr(scan_module, "_process", real)
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2  # the checkpoint is not silently reused
    assert "pass --resume" in capsys.readouterr().err
    assert main(argv + ["--resume", "--out", str(tmp_path / "out")]) == 0
    done = snce_fast.ScanStats.load(tmp_path / "out")
    whole = snce_fast.ScanStats.load(root / "stats")
    for f in TENSOR_FIELDS:  # `whole` read windows of 1,024 prompts: float sums agree to rounding
        if getattr(done, f).is_floating_point():
            torch.testing.assert_close(getattr(done, f), getattr(whole, f), rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(getattr(done, f), getattr(whole, f)), f


@pytest.mark.parametrize(
    "groups, message",
    [
        (["concept=CONCEPT"], "expected at least 2"),
        (["concept=CONCEPT", "concept=ORDINARY"], "given twice"),
        (["concept", "ordinary=ORDINARY"], "expected NAME=FILE"),
        (["concept=CONCEPT", "ordinary=/nonexistent/o.csv"], "does not exist"),
        (["concept=CONCEPT", "ordinary=ORDINARY,SAE_CONFIG"], "unsupported type"),
        (["bad name=CONCEPT", "ordinary=ORDINARY"], "may use only letters"),
    ],
)
def test_scan_bad_groups(env, tmp_path, capsys, groups, message):
    root = env["root"]
    sub = {"CONCEPT": str(root / "concept.txt"), "ORDINARY": str(root / "ordinary.csv"),
           "SAE_CONFIG": str(root / "sae" / "config.json")}
    argv = ["scan", "--model", str(root / "bert"), "--sae", str(root / "sae"), "--out", str(tmp_path / "o")]
    for g in groups:
        for key, val in sub.items():
            g = g.replace(key, val)
        argv += ["--group", g]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "setup, message",
    [
        ("narrow_sae", "d_in=16 but the encoder (BertModel) has width 32"),
        ("deep_hook", "hook 'layer:5' does not fit the encoder"),
        ("resume_without_checkpoint", "--resume needs --checkpoint"),
        ("existing_out", "already holds a scan"),
        ("missing_sae", "is not a directory"),
    ],
)
def test_scan_bad_inputs(env, tmp_path, capsys, setup, message):
    root = env["root"]
    sae, extra, out = str(root / "sae"), [], str(tmp_path / "o")
    if setup == "narrow_sae":
        random_sae(16, n=32, k=2).save(str(tmp_path / "narrow"))
        sae = str(tmp_path / "narrow")
    elif setup == "deep_hook":
        random_sae(32, n=32, k=2, hook="layer:5").save(str(tmp_path / "deep"))
        sae = str(tmp_path / "deep")
    elif setup == "resume_without_checkpoint":
        extra = ["--resume"]
    elif setup == "existing_out":
        out = str(root / "stats")
    elif setup == "missing_sae":
        sae = str(tmp_path / "nothing")
    argv = ["scan", "--model", str(root / "bert"), "--sae", sae, "--group", f"c={root / 'concept.txt'}",
            "--group", f"o={root / 'ordinary.csv'}", "--out", out, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# -- score ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["snce", "youden", "itd", "saeuron"])
def test_score_equals_api_and_writes_report(env, tmp_path, capsys, method):
    root = env["root"]
    out = tmp_path / "scores"
    assert main(["score", "--stats", str(root / "stats"), "--target", "concept", "--reference", "ordinary",
                 "--method", method, "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    stats = snce_fast.ScanStats.load(root / "stats")
    api = snce_fast.score(stats, target="concept", reference="ordinary", method=method)
    rec = json.loads((out / "scores.json").read_text())
    assert rec["method"] == method and rec["target"] == "concept" and rec["references"] == ["ordinary"]
    assert [e["latent"] for e in rec["top"]] == api.top(3)
    for e in rec["top"]:
        j = e["latent"]
        assert e["score"] == pytest.approx(float(api.values[j]))
        assert e["frequency"] == {g: pytest.approx(float(stats.frequency(g)[j])) for g in stats.groups}
        assert (out / f"latent_{j}.png").is_file()
        assert f"| {e['rank']} | {j} |" in (out / "report.md").read_text()
    assert f"{api.top(1)[0]:>7}" in printed.splitlines()[2]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp files left behind"


def test_score_token_level_equals_api(env, tmp_path):
    root = env["root"]
    assert main(["score", "--stats", str(root / "stats"), "--target", "concept", "--level", "token", "--method",
                 "youden", "--top", "4", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    rec = json.loads((tmp_path / "s" / "scores.json").read_text())
    api = snce_fast.score(snce_fast.ScanStats.load(root / "stats"), "concept", "ordinary", "youden", level="token")
    assert rec["level"] == "token" and [e["latent"] for e in rec["top"]] == api.top(4)
    assert [e["score"] for e in rec["top"]] == pytest.approx([float(api.values[j]) for j in api.top(4)])
    prompt_level = snce_fast.score(snce_fast.ScanStats.load(root / "stats"), "concept", "ordinary", "youden")
    assert [e["score"] for e in rec["top"]] != pytest.approx([float(prompt_level.values[j]) for j in api.top(4)])


def test_score_top_prompts_and_default_references(env, tmp_path):
    root = env["root"]
    out = tmp_path / "s"
    assert main(["score", "--stats", str(root / "stats"), "--target", "concept", "--top", "2", "--out", str(out),
                 "--sae", str(root / "sae"), "--model", str(root / "bert"), "--prompts-file",
                 str(root / "concept.txt"), "--top-prompts", "3", "--quiet"]) == 0
    rec = json.loads((out / "scores.json").read_text())
    assert rec["references"] == ["ordinary"]  # default: every other group
    sae = snce_fast.SAE.load(str(root / "sae"))
    latents = [e["latent"] for e in rec["top"]]
    want = top_prompts(env["enc"], env["tok"], sae, str(root / "concept.txt"), latents, k=3)
    for e in rec["top"]:
        got = [(p["activation"], p["prompt"]) for p in e["top_prompts"]]
        assert got == [(pytest.approx(v), t) for v, t in want[e["latent"]]]
    assert want[latents[0]][0][1] in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--target": "nudity"}, "'nudity' is not in this scan: expected one of ['concept', 'ordinary']"),
        ({"--reference": "violence"}, "'violence' is not in"),
        ({"--reference": "concept"}, "is also a reference group"),
        ({"--method": "bogus"}, "'bogus' is not a scorer: expected one of ('snce', 'youden', 'saeuron', 'itd')"),
        ({"--top": "0"}, "--top 0"),
        ({"--level": "word"}, "level='word' is invalid"),
        ({"--level": "token", "--method": "itd"}, "needs a frequency scorer"),
        ({"--stats": "/nonexistent/stats"}, "is not a directory"),
        ({"--stats": "SAE"}, "is not a saved scan"),
        ({"--sae": "SAE"}, "--sae and --prompts-file go together"),
    ],
)
def test_score_bad_inputs(env, tmp_path, capsys, change, message):
    root = env["root"]
    args = {"--stats": str(root / "stats"), "--target": "concept", "--out": str(tmp_path / "o")}
    args.update({k: (str(root / "sae") if v == "SAE" else v) for k, v in change.items()})
    argv = ["score"] + [x for k, v in args.items() for x in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# -- detect --------------------------------------------------------------------------------
def _rows(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return [{**r, "flag": r["flag"] == "True", "score": float(r["score"]), "tokens": int(r["tokens"])}
                for r in csv.DictReader(f)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_detect_equals_api(env, tmp_path, capsys, suffix):
    root = env["root"]
    stats = snce_fast.ScanStats.load(root / "stats")
    j = snce_fast.score(stats, "concept", "ordinary").top(1)[0]
    out = tmp_path / f"flags{suffix}"
    assert main(["detect", "--model", str(root / "bert"), "--sae", str(root / "sae"), "--neurons", str(j),
                 "--prompts-file", str(root / "mixed.csv"), "--prompt", "a naked man", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    prompts = ["a naked man"] + read_prompts(root / "mixed.csv")
    det = snce_fast.detect(env["enc"], snce_fast.SAE.load(str(root / "sae")), [j], prompts, tokenizer=env["tok"])
    rows = _rows(out)
    assert [r["prompt"] for r in rows] == prompts
    assert [r["flag"] for r in rows] == det.flags.tolist()
    assert [r["tokens"] for r in rows] == det.tokens.tolist()
    assert [r["score"] for r in rows] == pytest.approx(det.scores.tolist(), abs=1e-5)
    assert f"flagged {int(det.flags.sum())} of {len(prompts)} prompts" in printed


def test_detect_from_scores_with_labels(env, tmp_path, capsys):
    root = env["root"]
    assert main(["score", "--stats", str(root / "stats"), "--target", "concept", "--top", "2",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert main(["detect", "--model", str(root / "bert"), "--sae", str(root / "sae"), "--scores",
                 str(tmp_path / "s" / "scores.json"), "--top", "2", "--prompts-file", str(root / "mixed.csv"),
                 "--label-column", "label", "--min-tokens", "1"]) == 0
    printed = capsys.readouterr().out
    neurons = [e["latent"] for e in json.loads((tmp_path / "s" / "scores.json").read_text())["top"]]
    prompts = read_prompts(root / "mixed.csv")
    labels = [("nude" in p.split() or "naked" in p.split()) for p in prompts]
    det = snce_fast.detect(env["enc"], snce_fast.SAE.load(str(root / "sae")), neurons, prompts, tokenizer=env["tok"])
    flags = det.flags.tolist()
    tp = sum(f for f, lab in zip(flags, labels) if lab)
    fp = sum(f for f, lab in zip(flags, labels) if not lab)
    assert f"latent(s) {neurons[0]},{neurons[1]}" in printed
    assert f"({tp} of {sum(labels)} positives)" in printed
    assert f"({fp} of {len(labels) - sum(labels)} negatives)" in printed


def test_detect_calibrated_and_per_neuron_thresholds(env, tmp_path, capsys):
    from snce_fast.workflow.detect import prompt_activations
    from snce_fast.workflow.score import threshold_at_fpr

    root = env["root"]
    sae = snce_fast.SAE.load(str(root / "sae"))
    stats = snce_fast.ScanStats.load(root / "stats")
    j1, j2 = snce_fast.score(stats, "concept", "ordinary").top(2)
    ordinary = read_prompts(root / "ordinary.csv")
    mixed = read_prompts(root / "mixed.csv")
    base = ["detect", "--model", str(root / "bert"), "--sae", str(root / "sae")]
    # calibrated on the ordinary prompts: on those same prompts, a latent that fires on most of them
    # uncalibrated flags at most fpr of them
    busy = int(stats.prompts_fired[stats.index("ordinary")].argmax())
    assert int(stats.prompts_fired[stats.index("ordinary"), busy]) > 5
    assert main(base + ["--neurons", str(busy), "--calibrate-on", str(root / "ordinary.csv"), "--fpr", "0.1",
                        "--prompts-file", str(root / "ordinary.csv"), "--out", str(tmp_path / "o.csv")]) == 0
    assert sum(r["flag"] for r in _rows(tmp_path / "o.csv")) <= 5
    capsys.readouterr()
    # two latents calibrated, applied to other prompts: equal to the API with the same thresholds
    assert main(base + ["--neurons", f"{j1},{j2}", "--calibrate-on", str(root / "ordinary.csv"), "--fpr", "0.1",
                        "--prompts-file", str(root / "mixed.csv"), "--out", str(tmp_path / "m.csv")]) == 0
    printed = capsys.readouterr().out
    thr = threshold_at_fpr(prompt_activations(env["enc"], sae, [j1, j2], ordinary, tokenizer=env["tok"]), 0.1)
    det = snce_fast.detect(env["enc"], sae, [j1, j2], mixed, tokenizer=env["tok"], threshold=thr.tolist())
    assert [r["flag"] for r in _rows(tmp_path / "m.csv")] == det.flags.tolist()
    assert f"calibrated on 50 reference prompts at fpr 0.1: thresholds {j1}: {float(thr[0]):.4g}" in printed
    # explicit per-neuron thresholds, in --neurons order
    assert main(base + ["--neurons", f"{j2},{j1}", "--threshold", "0.05,0.3", "--prompts-file",
                        str(root / "mixed.csv"), "--out", str(tmp_path / "t.csv")]) == 0
    det = snce_fast.detect(env["enc"], sae, [j2, j1], mixed, tokenizer=env["tok"], threshold=[0.05, 0.3])
    assert [r["flag"] for r in _rows(tmp_path / "t.csv")] == det.flags.tolist()


@pytest.mark.parametrize("kind, encoder", [("sd", "text_encoder"), ("sdxl", "text_encoder_2")])
def test_detect_on_pipeline_dir(tmp_path, kind, encoder):
    pytest.importorskip("diffusers")
    from snce_fast.testing import sdxl_pipeline

    pipe = (sd_pipeline if kind == "sd" else sdxl_pipeline)(tmp_path / "build")
    pipe.save_pretrained(tmp_path / "pipe")
    sae = random_sae(32, n=64, k=3, seed=2)
    sae.save(str(tmp_path / "sae"))
    prompts = ["a photo of a cat", "a nude painting", "a red car in the city"]
    out = tmp_path / "flags.jsonl"
    assert main(["detect", "--model", str(tmp_path / "pipe"), "--encoder", encoder, "--sae", str(tmp_path / "sae"),
                 "--neurons", "3,5", *[x for p in prompts for x in ("--prompt", p)], "--out", str(out)]) == 0
    # SDXL: the SAE reads text_encoder_2's hidden_states[-2], as the pipeline does
    det = snce_fast.detect(pipe, {encoder: sae} if kind == "sdxl" else sae, [3, 5], prompts)
    rows = _rows(out)
    assert [r["flag"] for r in rows] == det.flags.tolist()
    assert [r["score"] for r in rows] == pytest.approx(det.scores.tolist(), abs=1e-5)
    assert [r["tokens"] for r in rows] == det.tokens.tolist()


def test_train_and_scan_on_sdxl_pipeline_dir(tmp_path):
    """--model PIPE --encoder text_encoder_2: the SAE trains and scans on hidden_states[-2], as SDXL reads it."""
    pytest.importorskip("diffusers")
    from snce_fast.testing import sdxl_pipeline

    pipe = sdxl_pipeline(tmp_path / "build")
    pipe.save_pretrained(tmp_path / "pipe")
    rng = random.Random(1)
    (tmp_path / "p.txt").write_text("\n".join(_prompts(rng, 40, 0.5)) + "\n")
    (tmp_path / "q.txt").write_text("\n".join(_prompts(rng, 20, 0.0)) + "\n")
    model = ["--model", str(tmp_path / "pipe"), "--encoder", "text_encoder_2"]
    assert main(["train", *model, "--prompts-file", str(tmp_path / "p.txt"), "--n-latents", "32", "--k", "3",
                 "--batch-size", "64", "--max-steps", "2", "--max-length", "16", "--out", str(tmp_path / "sae"),
                 "--quiet"]) == 0
    sae = snce_fast.SAE.load(str(tmp_path / "sae"))
    rep = json.loads((tmp_path / "sae" / "train_report.json").read_text())
    assert sae.d_in == 32 and rep["config"]["penultimate_output"] is True
    assert rep["config"]["encoder_name"].endswith("text_encoder_2")
    assert main(["scan", *model, "--sae", str(tmp_path / "sae"), "--group", f"p={tmp_path / 'p.txt'}",
                 "--group", f"q={tmp_path / 'q.txt'}", "--out", str(tmp_path / "stats"), "--quiet"]) == 0
    got = snce_fast.ScanStats.load(tmp_path / "stats")
    groups = {"p": [str(tmp_path / "p.txt")], "q": [str(tmp_path / "q.txt")]}
    want = snce_fast.scan(pipe.text_encoder_2, pipe.tokenizer_2, sae, groups, progress=False, penultimate_output=True)
    final = snce_fast.scan(pipe.text_encoder_2, pipe.tokenizer_2, sae, groups, progress=False)
    for f in TENSOR_FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert not torch.equal(got.act_sum, final.act_sum)  # the final-layer output would give other counts


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--neurons": None}, "exactly one of --neurons"),
        ({"--scores": "SCORES"}, "exactly one of --neurons"),
        ({"--neurons": "99"}, "out of range"),
        ({"--neurons": "1,x"}, "comma-separated"),
        ({"--min-tokens": "0"}, "--min-tokens 0"),
        ({"--out": "flags.txt"}, "expected a .csv or .jsonl"),
        ({"--prompts-file": None}, "no prompts"),
        ({"--label-column": "nosuch"}, "no such column"),
        ({"--sae": "NARROW"}, "d_in=16 but the encoder"),
        ({"--neurons": None, "--scores": "/nonexistent/scores.json"}, "does not exist"),
        ({"--neurons": None, "--scores": "SCORES", "--top": "9"}, "lists only 1 latents"),
        ({"--neurons": None, "--scores": "OTHER_SAE_SCORES"}, "different SAE"),
        ({"--neurons": None, "--scores": "BAD_LATENT_SCORES"}, "field 'top[].latent' holds 99"),
        ({"--threshold": "0.1,0.2"}, "2 values for neurons [1]"),
        ({"--threshold": "high"}, "expected a number"),
        ({"--threshold": "nan"}, "expected finite numbers"),
        ({"--threshold": "0.1", "--calibrate-on": "ORDINARY"}, "not both"),
        ({"--calibrate-on": "ORDINARY", "--fpr": "1.5"}, "0 <= fpr < 1"),
        ({"--calibrate-on": "/nonexistent/o.csv"}, "does not exist"),
    ],
)
def test_detect_bad_inputs(env, tmp_path, capsys, change, message):
    root = env["root"]
    scores = tmp_path / "scores.json"
    rec = {"format": "snce_fast.scores", "n_latents": 48, "sae_hash": sae_hash(
        snce_fast.SAE.load(str(root / "sae"))), "top": [{"latent": 1}]}
    scores.write_text(json.dumps(rec))
    (tmp_path / "other.json").write_text(json.dumps({**rec, "sae_hash": "0" * 64}))
    (tmp_path / "bad_latent.json").write_text(json.dumps({**rec, "top": [{"latent": 99}]}))
    random_sae(16, n=48, k=2).save(str(tmp_path / "narrow"))
    sub = {"SCORES": str(scores), "OTHER_SAE_SCORES": str(tmp_path / "other.json"),
           "BAD_LATENT_SCORES": str(tmp_path / "bad_latent.json"), "NARROW": str(tmp_path / "narrow"),
           "ORDINARY": str(root / "ordinary.csv")}
    args = {"--model": str(root / "bert"), "--sae": str(root / "sae"), "--neurons": "1",
            "--prompts-file": str(root / "mixed.csv"), "--out": str(tmp_path / "flags.csv")}
    args.update({k: sub.get(v, v) for k, v in change.items()})
    argv = ["detect"] + [x for k, v in args.items() if v is not None for x in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "flags.csv").exists()


# -- the whole chain -----------------------------------------------------------------------
def test_chain_train_scan_score_detect(env, tmp_path, capsys):
    """train -> scan -> score -> detect through the CLI only; each step reads the previous one's files."""
    root = env["root"]
    model = ["--model", str(root / "bert")]
    assert main(["train", *model, "--prompts-file", str(root / "train.txt"), "--out", str(tmp_path / "sae"),
                 *TRAIN_ARGS[:-1], "--max-steps", "4"]) == 0
    assert "next: snce-fast scan" in capsys.readouterr().out
    assert main(["scan", *model, "--sae", str(tmp_path / "sae"), "--group", f"concept={root / 'concept.txt'}",
                 "--group", f"ordinary={root / 'ordinary.csv'}", "--out", str(tmp_path / "stats"), "--quiet"]) == 0
    assert main(["score", "--stats", str(tmp_path / "stats"), "--target", "concept", "--reference", "ordinary",
                 "--out", str(tmp_path / "scores")]) == 0
    assert "next: snce-fast detect" in capsys.readouterr().out
    assert main(["detect", *model, "--sae", str(tmp_path / "sae"), "--scores", str(tmp_path / "scores" / "scores.json"),
                 "--prompts-file", str(root / "concept.txt"), "--out", str(tmp_path / "flags.csv")]) == 0
    summary = capsys.readouterr().out
    best = json.loads((tmp_path / "scores" / "scores.json").read_text())["top"][0]["latent"]
    stats = snce_fast.ScanStats.load(tmp_path / "stats")
    assert best == snce_fast.score(stats, "concept", "ordinary").top(1)[0]
    rows = _rows(tmp_path / "flags.csv")
    flagged = sum(r["flag"] for r in rows)
    assert f"flagged {flagged} of 40 prompts" in summary and f"latent(s) {best}," in summary
    # detect's rule (fires on >= 1 counted token) is the scan's prompt-level count for that latent
    assert flagged == int(stats.prompts_fired[stats.index("concept"), best])


def test_score_refuses_top_prompts_from_another_sae_of_the_same_width(env, tmp_path, capsys):
    other = tmp_path / "other_sae"
    random_sae(32, n=48, k=4, seed=11).save(other)  # same shape as the scanned SAE, different weights
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of the cat\n")
    argv = ["score", "--stats", str(env["root"] / "stats"), "--target", "concept", "--out", str(tmp_path / "o"),
            "--sae", str(other), "--prompts-file", str(prompts), "--model", str(env["root"] / "bert")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different SAE" in err and err.count("\n") == 1, err


def test_detect_labels_blank_is_unlabelled(tmp_path):
    from snce_fast.workflow.corpus import read_labels

    f = tmp_path / "lab.csv"
    f.write_bytes(b"prompt,label\na cat,1\na dog,\nbad \xff bytes,0\na car,0\n   ,1\n")
    assert read_labels(str(f), "label") == [True, None, False]  # undecodable and blank prompts skipped


def test_score_out_drops_plots_of_latents_no_longer_chosen(env, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "latent_99999.png").write_bytes(b"stale")
    assert main(["score", "--stats", str(env["root"] / "stats"), "--target", "concept", "--top", "2",
                 "--out", str(out), "--quiet"]) == 0
    top = [e["latent"] for e in json.loads((out / "scores.json").read_text())["top"]]
    assert sorted(p.name for p in out.glob("latent_*.png")) == sorted(f"latent_{j}.png" for j in top)

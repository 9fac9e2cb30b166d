"""`snce-fast demo`: every stage runs, the summary's numbers are recomputed from the files it wrote,
and the residual edit leaves silent prompts bit-identical. A tiny random BERT saved to disk stands in
for MiniLM here (CI runs the real MiniLM demo as the README's main job)."""
import json
import random

import pytest

import snce_fast
from snce_fast.cli import main
from snce_fast.demo.run import demo_prompts, run_demo
from snce_fast.demo.prompts import DemoPrompts
from snce_fast.testing import WORDS, bert_model, write_bert_tokenizer


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    tok = write_bert_tokenizer(d)
    model = bert_model(tok, hidden=32, layers=2, seed=3)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_prompts(seed=0) -> DemoPrompts:
    """Prompts in the tiny tokenizer's vocabulary: the 'concept' is the words nude/naked."""
    rng = random.Random(seed)
    plain = [w for w in WORDS if w not in ("nude", "naked")]

    def make(n, concept):
        out = []
        for _ in range(n):
            words = rng.sample(plain, 5)
            if concept:
                words.insert(rng.randrange(5), rng.choice(["nude", "naked"]))
            out.append(" ".join(words))
        return out

    data = DemoPrompts(train=make(150, False) + make(60, True), scan_concept=make(30, True),
                       scan_ordinary=make(30, False), held_concept=make(25, True), held_ordinary=make(25, False),
                       concept="nudity")
    # twins: the concept word replaced by a plain one; families: which concept word
    data.scan_twins = [p.replace("nude", "house").replace("naked", "house") for p in data.scan_concept]
    data.scan_families = ["nude" if "nude" in p.split() else "naked" for p in data.scan_concept]
    return data


def test_demo_prompt_splits_are_disjoint_and_deterministic():
    a, b = demo_prompts(quick=True), demo_prompts(quick=True)
    assert a == b
    groups = [a.train, a.scan_concept, a.scan_ordinary, a.held_concept, a.held_ordinary]
    assert sum(len(g) for g in groups) == len(set().union(*map(set, groups)))
    from snce_fast.demo.prompts import HELDOUT_VIOLENT_ACTIONS

    seen = " | ".join(a.train + a.scan_concept)
    assert not any(phrase in seen for phrase in HELDOUT_VIOLENT_ACTIONS)
    # one neutral twin per scan concept prompt, in no other split, tagged with its action's family
    from snce_fast.demo.prompts import ORDINARY_ACTIONS, VIOLENT_FAMILIES

    assert len(a.scan_twins) == len(a.scan_concept) == len(a.scan_families)
    assert not set(a.scan_twins) & set().union(*map(set, groups)) and len(set(a.scan_twins)) == len(a.scan_twins)
    for c, t, f in zip(a.scan_concept, a.scan_twins, a.scan_families):
        action = next(x for x in VIOLENT_FAMILIES[f] if x in c)
        assert any(t == c.replace(action, o, 1) for o in ORDINARY_ACTIONS)
    assert set(a.scan_families) == set(VIOLENT_FAMILIES)


def test_demo_runs_every_stage_and_its_numbers_are_real(tiny_bert_dir, tmp_path):
    data = tiny_prompts()
    out = tmp_path / "demo"
    logs = []
    s = run_demo(out, model=str(tiny_bert_dir), quick=True, progress=False, log=logs.append, prompts=data)
    assert [line.split("]")[0] for line in logs] == [f"[{i}/6" for i in range(1, 7)]
    for name in ("summary.json", "summary.md", "detect.png", "training.png", "report/report.md", "sae/config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))

    # the neuron is contrastive identification's choice on the scan prompts (recomputed from the saved SAE)
    sae = snce_fast.SAE.load(out / "sae")
    from snce_fast.models import load_encoder

    enc = load_encoder(str(tiny_bert_dir))
    kw = dict(tokenizer=enc.tokenizer, max_length=s["max_length"])
    from snce_fast.demo.run import demo_families
    from snce_fast.workflow.contrastive import activation_table, contrastive

    fams = demo_families(data)
    table = activation_table(enc.encoder, sae, [p for f in fams for p in f.concept + f.twins] + data.scan_ordinary,
                             **kw)
    fit = contrastive(table, fams, {"ordinary": data.scan_ordinary})
    r = s["neuron_rule"]
    assert r["rule"] == "contrastive" and s["neuron"] == r["latent"] == fit.top(1)[0]
    assert r["threshold"] == pytest.approx(fit.thresholds_for([s["neuron"]])[0])
    assert r["scan_ordinary_rate"] <= r["fpr"]["ordinary"]
    if r["scan_twin_rate"] is not None:
        assert r["scan_twin_rate"] <= r["twin_fpr"]

    # held-out detect numbers recomputed: the neuron at its calibrated threshold
    det_c = snce_fast.detect(enc.encoder, sae, [s["neuron"]], data.held_concept, threshold=r["threshold"], **kw)
    det_o = snce_fast.detect(enc.encoder, sae, [s["neuron"]], data.held_ordinary, threshold=r["threshold"], **kw)
    assert s["detect"]["concept_flagged"] == int(det_c.flags.sum())
    assert s["detect"]["ordinary_flagged"] == int(det_o.flags.sum())
    assert s["detect"]["true_positive_rate"] == pytest.approx(float(det_c.flags.float().mean()))

    # the scorer's top 1 / 2 / 4 latents, any firing, for comparison
    stats = snce_fast.ScanStats.load(out / "scan")
    assert s["detect"]["score_top"][0]["latents"] == snce_fast.score(stats, target="nudity", reference="ordinary").top(1)
    previous = 0.0
    for m in s["detect"]["score_top"]:
        flags = snce_fast.detect(enc.encoder, sae, m["latents"], data.held_concept, **kw).flags
        assert m["true_positive_rate"] == pytest.approx(float(flags.float().mean()))
        assert m["true_positive_rate"] >= previous  # more latents never flag fewer
        previous = m["true_positive_rate"]
    e = s["edit"]
    assert e["ordinary_silent_bit_identical"] == e["ordinary_silent"]  # docs/method.md: silent -> bit-identical
    assert e["concept_changed"] <= e["concept_neuron_fires"]
    if e["concept_changed"]:
        assert e["change_off_neuron_axis_relative"] < 1e-4  # only W_dec[neuron] moved
    assert e["concept_refires_after_edit"] <= e["concept_neuron_fires"]
    md = (out / "summary.md").read_text()
    assert f"latent {s['neuron']}" in md and f"flagged {s['detect']['concept_flagged']} of 25" in md
    assert not [p for p in out.rglob(".*")], "no temp files left behind"


def test_demo_numbers_do_not_depend_on_the_callers_thread_count(tiny_bert_dir, tmp_path):
    """The demo runs on its own fixed thread count (docs/demo.md): a machine with more cores prints the
    same numbers, and the caller's setting is restored afterwards."""
    import torch

    data, old = tiny_prompts(), torch.get_num_threads()
    runs = []
    try:
        for i, threads in enumerate((1, 3)):
            torch.set_num_threads(threads)
            s = run_demo(tmp_path / f"o{i}", model=str(tiny_bert_dir), quick=True, progress=False, log=lambda _: None,
                         prompts=data)
            assert torch.get_num_threads() == threads
            s.pop("seconds")
            runs.append(s)
    finally:
        torch.set_num_threads(old)
    assert runs[0] == runs[1]


def test_demo_cli_bad_inputs(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["demo", "--out", str(f), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["demo", "--model", "/nonexistent/model", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no such local directory" in err and err.count("\n") == 1
    assert main(["demo", "--threads", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--threads 0" in capsys.readouterr().err


def test_demo_on_an_sdxl_pipeline_reads_the_penultimate_layer(tmp_path):
    """On an SDXL pipeline dir every stage reads hidden_states[-2], as the pipeline does: the patch changes
    exactly the prompts on which the neuron fires, and detect agrees with the scan's tensor."""
    from snce_fast.testing import sdxl_pipeline

    sdxl_pipeline(tmp_path / "build").save_pretrained(tmp_path / "sdxl")
    s = run_demo(tmp_path / "o", model=str(tmp_path / "sdxl"), quick=True, progress=False, log=lambda _: None,
                 prompts=tiny_prompts())
    e = s["edit"]
    assert e["concept_changed"] == e["concept_neuron_fires"]
    assert e["ordinary_silent_bit_identical"] == e["ordinary_silent"]
    assert e["ordinary_changed"] == len(tiny_prompts().held_ordinary) - e["ordinary_silent"]

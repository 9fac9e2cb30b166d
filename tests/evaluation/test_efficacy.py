"""snce_fast.evaluation.efficacy: a planted concept direction on a tiny encoder is removed by the right
edit and not by a wrong one; the reader's threshold is fixed before any edit; bad inputs."""
from __future__ import annotations

import pytest
import torch

from helpers_efficacy import PLANTED, WRONG, planted_encoder, planted_sae, prompts
from snce_fast.evaluation import efficacy
from snce_fast.evaluation.efficacy import PromptSets, leace_edit, measure_erasure, no_edit, snce_edit
from snce_fast.evaluation.probes import auc, fit_probe, mean_pool


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    enc, tok, u = planted_encoder(tmp_path_factory.mktemp("planted"))
    c, o = prompts(100, 0, True), prompts(160, 1, False)
    sets = PromptSets(c[:50], o[:80], c[50:], o[80:], pairs=[("red nude house", "red woman house")])
    return enc, tok, planted_sae(u), sets


@pytest.fixture(scope="module")
def measured(planted):
    enc, tok, sae, sets = planted
    edits = [no_edit(), snce_edit(sae, PLANTED, name="right"), snce_edit(sae, WRONG, name="wrong"),
             snce_edit(sae, PLANTED, gate=True, threshold=1.0, name="right gated")]
    return measure_erasure(enc, sets, edits, tokenizer=tok)


def test_right_edit_removes_the_planted_direction(measured):
    none, right, gated = (measured.reports[k] for k in ("none", "right", "right gated"))
    assert none["survival"] == 1.0 and none["concept_flag_before"] > 0.9
    assert right["survival"] <= 0.15
    assert gated["survival"] <= 0.15
    # the planted latent never fires on ordinary prompts: not one of their embeddings changes
    assert right["generic"]["changed"] == 0.0 and right["generic"]["flag_after"] == right["generic"]["flag_before"]
    assert right["concept_changed"] == 1.0
    assert right["pairs"]["cos_after"] > right["pairs"]["cos_before"]
    assert right["pairs"]["cos_after"] > 0.99


def test_wrong_edit_does_not(measured):
    wrong = measured.reports["wrong"]
    assert wrong["survival"] >= 0.9
    assert wrong["retrained_auc"] > 0.95
    assert wrong["generic"]["changed"] > 0  # and it costs ordinary prompts


def test_no_edit_is_the_floor(measured):
    none = measured.reports["none"]
    assert none["concept_changed"] == 0.0 and none["generic"]["changed"] == 0.0
    assert none["generic"]["mean_rel_change"] == 0.0
    assert none["pairs"]["cos_after"] == none["pairs"]["cos_before"]


def test_reader_threshold_is_fixed_before_the_edit(planted, monkeypatch):
    """The threshold is set once, on unedited ordinary prompts, before any edit runs; an edit that sees the
    reader cannot move it (the same threshold whatever the edits are)."""
    enc, tok, sae, sets = planted
    calls = []
    real = efficacy.LinearProbe.fix_threshold

    def spy(self, negatives, fpr):
        calls.append(("fix", fpr))
        return real(self, negatives, fpr)

    class Watch(efficacy.Edit):
        name = "watch"

        def apply(self, hidden, counted):
            calls.append(("apply", None))
            return hidden * 3.0  # would move a threshold fitted on edited prompts

    monkeypatch.setattr(efficacy.LinearProbe, "fix_threshold", spy)
    a = measure_erasure(enc, sets, [Watch()], tokenizer=tok, fpr=0.05)
    b = measure_erasure(enc, sets, [no_edit()], tokenizer=tok, fpr=0.05)
    assert calls[0] == ("fix", 0.05) and calls.count(("fix", 0.05)) == 2
    assert calls.index(("apply", None)) > 0
    assert a.reader_threshold == b.reader_threshold
    # the threshold flags at most 5% of the (unedited) training ordinary prompts
    emb = efficacy.embed_tokens(enc, sets.ordinary_train, tok)
    pooled = torch.stack([e[1:].mean(0) for e in (emb[p] for p in sets.ordinary_train)])
    reader = fit_probe(torch.stack([emb2[1:].mean(0) for emb2 in efficacy.embed_tokens(enc, sets.concept_train, tok).values()]), pooled)
    assert int((reader.scores(pooled) > a.reader_threshold).sum()) <= int(0.05 * len(pooled))


def test_leace_erases_linear_information(planted):
    pytest.importorskip("concept_erasure")
    enc, tok, sae, sets = planted
    r = measure_erasure(enc, sets, [leace_edit(), leace_edit(gate=(sae, [PLANTED], 1.0, 1))], tokenizer=tok)
    everywhere, gated = r.reports["leace"], r.reports[f"leace gated [{PLANTED}]"]
    assert abs(everywhere["retrained_auc"] - 0.5) < 0.1
    assert everywhere["generic"]["changed"] == 1.0  # applied to every token: every ordinary prompt moves
    assert gated["generic"]["changed"] == 0.0 and gated["concept_changed"] == 1.0


def test_reconstruct_mode_changes_every_prompt(planted):
    enc, tok, sae, sets = planted
    r = measure_erasure(enc, sets, [snce_edit(sae, PLANTED, mode="reconstruct", name="rec")], tokenizer=tok)
    assert r.reports["rec"]["generic"]["changed"] == 1.0


def test_bad_inputs(planted):
    enc, tok, sae, sets = planted
    with pytest.raises(ValueError, match="concept_test is empty"):
        measure_erasure(enc, PromptSets(sets.concept_train, sets.ordinary_train, [], sets.generic_test), [no_edit()],
                        tokenizer=tok)
    with pytest.raises(ValueError, match=r"pairs\[0\]"):
        PromptSets(["a"], ["b"], ["c"], ["d"], pairs=[("only one",)]).check()
    with pytest.raises(ValueError, match="d_in=16 but the encoder"):
        measure_erasure(enc, sets, [snce_edit(planted_sae(torch.ones(16) / 4), PLANTED)], tokenizer=tok)
    with pytest.raises(ValueError, match="hook 'output'"):
        snce_edit(type(sae).random(32, 16, 2, seed=0, hook="layer:0"), 1)
    with pytest.raises(ValueError, match="fpr"):
        measure_erasure(enc, sets, [no_edit()], tokenizer=tok, fpr=1.5)
    with pytest.raises(ValueError, match="no edits"):
        measure_erasure(enc, sets, [], tokenizer=tok)


def test_probe_helpers():
    torch.manual_seed(0)
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5
    h = torch.randn(2, 4, 3)
    counted = torch.tensor([[False, True, True, False], [False, True, False, False]])
    assert torch.allclose(mean_pool(h, counted)[0], h[0, 1:3].mean(0))
    pos, neg = torch.randn(50, 3) + 3, torch.randn(80, 3)
    p = fit_probe(pos, neg)
    with pytest.raises(ValueError, match="not fixed"):
        p.flags(pos)
    p.fix_threshold(neg, 0.05)
    assert int(p.flags(neg).sum()) <= int(0.05 * len(neg))


def test_skipping_prompts_an_edit_cannot_change_is_exact(planted, monkeypatch):
    """may_change only saves work: running every prompt through the edit gives the same report."""
    enc, tok, sae, sets = planted
    edits = lambda: [snce_edit(sae, PLANTED, name="right"), snce_edit(sae, PLANTED, gate=True, threshold=1.0, name="g"),  # noqa: E731
                     snce_edit(sae, WRONG, scale=-4.0, name="wrong")]
    fast = measure_erasure(enc, sets, edits(), tokenizer=tok)
    monkeypatch.setattr(efficacy.SNCEEdit, "may_change", lambda self, emb, prompts: None)
    slow = measure_erasure(enc, sets, edits(), tokenizer=tok)
    assert fast.reports == slow.reports


@pytest.mark.parametrize("options", [dict(), dict(gate=True, threshold=1.0), dict(scale=-4.0, gate=True, threshold=1.0),
                                     dict(clamp=-1.0), dict(mode="reconstruct")])
def test_the_measured_edit_is_what_patch_applies(planted, options):
    """snce_edit on the encoder output == the output of the encoder patched with snce_fast.patch (one prompt
    per call, so no padding), bit for bit on every position."""
    import snce_fast

    enc, tok, sae, sets = planted
    edit = snce_edit(sae, PLANTED, **options)
    for p in sets.concept_test[:3] + sets.generic_test[:3]:
        ids = tok([p], return_tensors="pt")
        with torch.no_grad():
            x = enc(**ids).last_hidden_state
            counted = torch.ones(x.shape[:2], dtype=torch.bool)
            counted[:, 0] = False
            measured = edit.apply(x, counted)
            with snce_fast.patched(enc, sae, neurons=PLANTED, **options):
                out = enc(**ids).last_hidden_state
        assert torch.equal(measured, out), (p, options)

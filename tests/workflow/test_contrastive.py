"""Contrastive identification: a latent that reads one wording only loses to one that reads the
concept in every wording; the leave-one-family-out matrix shows which selections transfer."""
import pytest
import torch

from snce_fast.sae.model import SAE
from snce_fast.testing import bert_model, write_bert_tokenizer
from snce_fast.workflow.contrastive import (
    ActivationTable, Family, activation_table, contrastive, evaluate, families_from_pairs, transfer_matrix,
)
from snce_fast.workflow.pairs import Pair

ONE, ALL = 3, 6  # ONE reads the word "nude" only, ALL reads the concept in "nude" and "naked" alike
POOL = ["red", "blue", "green", "car", "tree", "house", "river", "boat", "sky", "night", "street", "city"]


def _table(cols: dict[int, dict[str, list[float]]], prompts: dict[str, list[str]], n_latents: int = 8):
    """A synthetic ActivationTable: latent j's value on group g's prompts = cols[j][g] (0 elsewhere)."""
    order = [p for g in prompts for p in prompts[g]]
    vals = torch.zeros(len(order), n_latents)
    for j, per_group in cols.items():
        at = 0
        for g, ps in prompts.items():
            v = per_group.get(g)
            if v is not None:
                vals[at: at + len(ps), j] = torch.tensor(v)
            at += len(ps)
    return ActivationTable(order, list(range(n_latents)), vals)


def test_one_wording_latent_loses_to_the_all_wordings_latent():
    # family a (30 pairs) is worded one way, family b (10 pairs) another. Latent ONE fires on all of a and
    # none of b (pooled recall 0.75); latent ALL on 70% of each (pooled 0.70): the pooled rule would pick
    # ONE, the per-family minimum picks ALL
    ps = {"a": [f"a{i}" for i in range(30)], "b": [f"b{i}" for i in range(10)],
          "ta": [f"ta{i}" for i in range(30)], "tb": [f"tb{i}" for i in range(10)], "coco": [f"c{i}" for i in range(100)]}
    table = _table({ONE: {"a": [5.0] * 30}, ALL: {"a": [4.0] * 21 + [0.0] * 9, "b": [4.0] * 7 + [0.0] * 3},
                    1: {"coco": [9.0] * 100, "a": [9.0] * 30, "b": [9.0] * 10}}, ps)
    fams = [Family("a", ps["a"], ps["ta"]), Family("b", ps["b"], ps["tb"])]
    pooled = (table.rows(ps["a"] + ps["b"]) > 0).float().mean(0)
    assert pooled[ONE] > pooled[ALL]  # what a pooled-recall rule would prefer
    fit = contrastive(table, fams, {"coco": ps["coco"]}, objective="min")
    assert fit.top(1) == [ALL]
    assert fit.score[0] == pytest.approx(0.7)
    assert fit.recall[:, fit.latents.index(ONE)].tolist() == [1.0, 0.0]
    assert ONE in fit.latents and fit.score[fit.latents.index(ONE)] == 0.0
    assert fit.score[fit.latents.index(1)] < 0.0 or fit.thresholds[fit.latents.index(1)] >= 9.0  # fires on COCO
    mean = contrastive(table, fams, {"coco": ps["coco"]})  # the default objective
    assert mean.top(1) == [ALL]  # mean contrast: 0.7 vs 0.5
    # the greedy set: ALL, then ONE adds recall on a (min stays at b's 0.7, so with "min" it stops)
    assert fit.select(3).latents == [ALL]
    assert mean.select(3).latents == [ALL, ONE]
    sel = mean.select(3)
    assert sel.family_recall == pytest.approx({"a": 1.0, "b": 0.7}) and sel.twin_rate == 0.0 and sel.reference_rates == {"coco": 0.0}


def test_thresholds_bound_twins_and_references():
    ps = {"c": [f"c{i}" for i in range(20)], "t": [f"t{i}" for i in range(20)], "r": [f"r{i}" for i in range(100)]}
    # latent 2 fires on every concept prompt (5) and on its twins (1..20 ascending): the threshold must cut twins
    table = _table({2: {"c": [5.0] * 20, "t": [float(i) for i in range(1, 21)], "r": [0.5] * 100}}, ps)
    fit = contrastive(table, [Family("f", ps["c"], ps["t"])], {"r": ps["r"]}, twin_fpr=0.1, fpr=0.0)
    thr = fit.thresholds_for([2])[0]
    assert thr == 18.0  # at most 10% of 20 twins (values 19 and 20) above it: the concept (5) is cut too
    res = evaluate(table, [2], [thr], [Family("f", ps["c"], ps["t"])], {"r": ps["r"]})
    assert res["families"]["f"] == {"concept": 0.0, "twins": pytest.approx(0.1), "n": 20}
    assert res["references"] == {"r": 0.0}
    with pytest.raises(ValueError, match=r"twin_fpr=1.5 is invalid"):
        contrastive(table, [Family("f", ps["c"], ps["t"])], {"r": ps["r"]}, twin_fpr=1.5)
    with pytest.raises(ValueError, match=r"objective='max' is invalid"):
        contrastive(table, [Family("f", ps["c"], ps["t"])], {"r": ps["r"]}, objective="max")
    with pytest.raises(ValueError, match=r"1 prompts are not in the activation table \(first: 'zz'\)"):
        contrastive(table, [Family("f", ["zz"], [])], {"r": ps["r"]})
    with pytest.raises(ValueError, match="family 'f' has no concept prompts"):
        contrastive(table, [Family("f", [], [])], {"r": ps["r"]})
    with pytest.raises(ValueError, match="no twins and no references"):
        contrastive(table, [Family("f", ps["c"], [])], {})


def test_families_from_pairs_groups_by_tag():
    fams = families_from_pairs([Pair("a nude", "a", "x"), Pair("b nude", "b", "y"), Pair("c nude", "c", "x")],
                               concept_only={"i2p": ["d nude"]})
    assert [(f.name, f.concept, f.twins) for f in fams] == [
        ("x", ["a nude", "c nude"], ["a", "c"]), ("y", ["b nude"], ["b"]), ("i2p", ["d nude"], [])]
    with pytest.raises(ValueError, match="identical members"):
        families_from_pairs([("same", "same")])


# ------------------------------------------------------------------------------- a real (tiny) encoder
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny BERT whose output gets 20*u1 on "nude" tokens and 20*u2 on "nude" and "naked" tokens
    ("nude", "naked" and the twin word "woman" share one input embedding), and an SAE whose latent ONE
    reads u1 and ALL reads u2."""
    d = tmp_path_factory.mktemp("contrastive")
    tok = write_bert_tokenizer(d / "tok")
    enc = bert_model(tok, hidden=32, layers=2, seed=0)
    nude, naked, woman = tok.convert_tokens_to_ids(["nude", "naked", "woman"])
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(32, 2, generator=g)).Q.T  # two orthonormal directions
    with torch.no_grad():
        emb = enc.embeddings.word_embeddings.weight
        emb[nude] = emb[woman]
        emb[naked] = emb[woman]
    ids = {}

    def stash(mod, args, kwargs):
        ids["x"] = kwargs.get("input_ids", args[0] if args else None)

    def plant(mod, inp, out):
        x = ids["x"]
        return out + 20.0 * ((x == nude).unsqueeze(-1) * u[0] + ((x == nude) | (x == naked)).unsqueeze(-1) * u[1])

    enc.register_forward_pre_hook(stash, with_kwargs=True)
    enc.encoder.layer[-1].output.register_forward_hook(plant)
    sae = SAE.random(32, 16, 2, seed=0, hook="output")
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.fill_(5.0)
        for j, v in ((ONE, u[0]), (ALL, u[1])):
            sae.W_enc[:, j] = v
            sae.W_dec[j] = v
            sae.b_enc[j] = 0.0
    return enc, tok, sae


def _pairs(word: str, n: int, seed: int, family: str) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        words = [POOL[int(j)] for j in torch.randint(len(POOL), (4,), generator=g)]
        at = int(torch.randint(5, (1,), generator=g))
        c = " ".join(words[:at] + [word] + words[at:])
        t = " ".join(words[:at] + ["woman"] + words[at:])
        if all(p.concept != c for p in out):
            out.append(Pair(c, t, family))
    return out


def test_planted_encoder_selection_and_transfer_matrix(planted):
    enc, tok, sae = planted
    pairs = _pairs("nude", 12, 0, "nude") + _pairs("naked", 12, 1, "naked")
    fams = families_from_pairs(pairs)
    coco = [" ".join(POOL[(i + j) % len(POOL)] for j in range(4)) for i in range(40)]
    table = activation_table(enc, sae, [p for f in fams for p in f.concept + f.twins] + coco, tokenizer=tok)
    assert table.values.shape == (24 * 2 + len(set(coco)), 16)
    fit = contrastive(table, fams, {"coco": coco})
    assert fit.top(1) == [ALL]  # ONE reads "nude" only: contrast 1 on one family, 0 on the other
    assert fit.recall[:, 0].min() >= 0.9 and fit.twin_rate[:, 0].tolist() == [0.0, 0.0]
    one = fit.latents.index(ONE)
    assert fit.recall[0, one] >= 0.9 and fit.recall[1, one] == 0.0

    tm = transfer_matrix(table, fams, {"coco": coco})
    assert [r["left_out"] for r in tm.rows] == ["nude", "naked"]
    # selected without the "naked" family, ONE reads the "nude" wording as well as ALL (or better): it is
    # chosen and the transfer test shows it: 0% of the unseen "naked" wording flagged
    by = {r["left_out"]: r for r in tm.rows}
    assert by["naked"]["latents"] == [ONE] and tm.held_out("naked") == {"concept": 0.0, "twins": 0.0, "n": 12}
    assert by["naked"]["rates"]["families"]["nude"]["concept"] >= 0.9
    # selected without "nude", ALL is the only latent that reads "naked": it transfers to "nude"
    assert by["nude"]["latents"] == [ALL] and tm.held_out("nude")["concept"] >= 0.9
    mean = tm.mean_held_out()
    assert mean["concept"] == pytest.approx(tm.held_out("nude")["concept"] / 2) and mean["coco"] == 0.0
    with pytest.raises(ValueError, match="leave-one-family-out needs at least 2"):
        transfer_matrix(table, fams[:1], {"coco": coco})

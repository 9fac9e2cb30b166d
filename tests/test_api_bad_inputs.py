"""Every public entry point of snce_fast (the names in snce_fast.__all__) driven with bad input: each
case must raise ValueError / TypeError / FileNotFoundError whose message names the bad value or what
was expected, and must write nothing. Tests of the same checks in depth live beside each module; this
module keeps the whole public surface in one table, so a new entry point without checks shows up here."""
from __future__ import annotations

import json
import math

import pytest
import torch

import snce_fast
from snce_fast.testing import bert_model, random_sae, write_bert_tokenizer

NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def enc_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    tok = write_bert_tokenizer(d)
    return bert_model(tok), tok


@pytest.fixture(scope="module")
def sae(enc_tok):
    enc, _ = enc_tok
    return random_sae(enc.config.hidden_size, 64, 4)


@pytest.fixture(scope="module")
def stats(enc_tok, sae):
    enc, tok = enc_tok
    return snce_fast.scan(enc, tok, sae, {"t": ["a nude woman"] * 3, "r": ["a red car"] * 3}, progress=False)


def _nan_sae(sae):
    bad = random_sae(sae.d_in, sae.n_latents, sae.k)
    with torch.no_grad():
        bad.b_enc[3] = NAN
    return bad


CASES = {
    # name: (call(enc, tok, sae, stats, tmp), exception, message regex)
    "SAE k too large": (lambda e, t, s, st, p: snce_fast.SAE(8, 4, 5), ValueError, r"k=5"),
    "SAE k float": (lambda e, t, s, st, p: snce_fast.SAE(8, 16, 2.5), ValueError, r"k=2.5"),
    "SAE bad hook": (lambda e, t, s, st, p: snce_fast.SAE(8, 16, 2, hook="layer:x"), ValueError, r"hook='layer:x'"),
    "SAE.from_tensors NaN": (lambda e, t, s, st, p: snce_fast.SAE.from_tensors(
        torch.full((4, 8), NAN), torch.zeros(8), torch.zeros(8, 4), torch.zeros(4), k=2), ValueError, r"W_enc.*NaN/inf"),
    "SAE.load missing dir": (lambda e, t, s, st, p: snce_fast.SAE.load(p / "nope"), FileNotFoundError, r"nope"),
    "ErasureSAE.load missing dir": (lambda e, t, s, st, p: snce_fast.ErasureSAE.load(p / "nope"), FileNotFoundError,
                                    r"nope"),
    "slim neurons str": (lambda e, t, s, st, p: s.slim("552"), TypeError, r"neurons must be an int"),
    "patch neurons str": (lambda e, t, s, st, p: snce_fast.patch(e, s, "251"), TypeError, r"neurons must be an int"),
    "patch neurons float": (lambda e, t, s, st, p: snce_fast.patch(e, s, [2.7]), TypeError, r"2.7"),
    "patch neuron out of range": (lambda e, t, s, st, p: snce_fast.patch(e, s, 64), ValueError, r"neuron index 64"),
    "patch scale NaN": (lambda e, t, s, st, p: snce_fast.patch(e, s, 1, scale=NAN), ValueError, r"scale=nan"),
    "patch clamp inf": (lambda e, t, s, st, p: snce_fast.patch(e, s, 1, clamp=INF), ValueError, r"clamp=inf"),
    "patch threshold NaN": (lambda e, t, s, st, p: snce_fast.patch(e, s, 1, gate=True, threshold=NAN), ValueError,
                            r"threshold nan is not finite"),
    "patch bad mode": (lambda e, t, s, st, p: snce_fast.patch(e, s, 1, mode="bogus"), ValueError, r"mode='bogus'"),
    "patch min_tokens 0": (lambda e, t, s, st, p: snce_fast.patch(e, s, 1, min_tokens=0), ValueError, r"min_tokens"),
    "patch NaN weights": (lambda e, t, s, st, p: snce_fast.patch(e, _nan_sae(s), 1), ValueError, r"b_enc.*NaN/inf"),
    "patch wrong width": (lambda e, t, s, st, p: snce_fast.patch(e, random_sae(16, 64, 4), 1), ValueError, r"d_in=16"),
    "patched scale NaN": (lambda e, t, s, st, p: snce_fast.patched(e, s, 1, scale=NAN).__enter__(), ValueError,
                          r"scale=nan"),
    "unpatch not a pipeline": (lambda e, t, s, st, p: snce_fast.unpatch(42), TypeError, r"int"),
    "scan missing file": (lambda e, t, s, st, p: snce_fast.scan(e, t, s, {"a": str(p / "nope.txt")}, progress=False),
                          FileNotFoundError, r"group 'a'.*nope.txt"),
    "scan bare string": (lambda e, t, s, st, p: snce_fast.scan(e, t, s, {"a": "a cat"}, progress=False), ValueError,
                         r"not a prompt file"),
    "scan empty group": (lambda e, t, s, st, p: snce_fast.scan(e, t, s, {"a": ["  "]}, progress=False), ValueError,
                         r"group 'a' has no usable prompts"),
    "scan batch_size 0": (lambda e, t, s, st, p: snce_fast.scan(e, t, s, {"a": ["x"]}, batch_size=0), ValueError,
                          r"batch_size"),
    "scan NaN SAE": (lambda e, t, s, st, p: snce_fast.scan(e, t, _nan_sae(s), {"a": ["x"]}, progress=False), ValueError,
                     r"b_enc.*NaN/inf"),
    "score unknown group": (lambda e, t, s, st, p: snce_fast.score(st, target="nope", reference="r"), (KeyError, ValueError),
                            r"nope"),
    "score bad method": (lambda e, t, s, st, p: snce_fast.score(st, target="t", reference="r", method="bogus"),
                         (KeyError, ValueError), r"bogus"),
    "threshold_at_fpr fpr 1": (lambda e, t, s, st, p: snce_fast.threshold_at_fpr(torch.ones(4), 1.0), ValueError,
                               r"fpr=1.0"),
    "threshold_at_fpr empty": (lambda e, t, s, st, p: snce_fast.threshold_at_fpr(torch.ones(0), 0.1), ValueError,
                               r"no prompts"),
    "detect neurons str": (lambda e, t, s, st, p: snce_fast.detect(e, s, "12", ["a cat"], tokenizer=t), TypeError,
                           r"neurons must be an int"),
    "detect no tokenizer": (lambda e, t, s, st, p: snce_fast.detect(e, s, 1, ["a cat"]), ValueError, r"tokenizer"),
    "detect min_tokens 0": (lambda e, t, s, st, p: snce_fast.detect(e, s, 1, ["a"], tokenizer=t, min_tokens=0),
                            ValueError, r"min_tokens"),
    "prompt_activations dict SAE": (lambda e, t, s, st, p: snce_fast.prompt_activations(e, {"a": s}, 1, ["x"], t),
                                    ValueError, r"one SAE"),
    "calibrate empty target": (lambda e, t, s, st, p: snce_fast.calibrate(e, s, None, [], ["a car"], tokenizer=t),
                               ValueError, r"target_prompts is empty"),
    "calibrate empty reference": (lambda e, t, s, st, p: snce_fast.calibrate(e, s, None, ["x"], [], tokenizer=t),
                                  ValueError, r"reference_prompts is empty"),
    "calibrate fpr names": (lambda e, t, s, st, p: snce_fast.calibrate(e, s, None, ["x"], {"a": ["y"]}, fpr={"b": 0.1},
                                                                        tokenizer=t), ValueError, r"fpr names groups"),
    "train_sae k > n": (lambda e, t, s, st, p: snce_fast.train_sae(e, t, ["a cat"], n_latents=8, k=9, progress=False),
                        ValueError, r"k"),
    "train_sae no prompts": (lambda e, t, s, st, p: snce_fast.train_sae(e, t, [], n_latents=8, k=2, progress=False),
                             ValueError, r"prompt"),
    "train_sae lr inf": (lambda e, t, s, st, p: snce_fast.train_sae(e, t, ["a"], n_latents=8, k=2, lr=INF,
                                                                   progress=False), ValueError, r"lr"),
    "set_verbosity unknown level": (lambda e, t, s, st, p: snce_fast.set_verbosity("loud"), ValueError,
                                    r"level='loud'"),
    "set_verbosity bool": (lambda e, t, s, st, p: snce_fast.set_verbosity(True), TypeError, r"level=True"),
    "SAE.from_pretrained missing": (lambda e, t, s, st, p: snce_fast.SAE.from_pretrained(p / "nope"), FileNotFoundError,
                                    r"nope"),
    "SAE.from_pretrained not a repo id": (lambda e, t, s, st, p: snce_fast.SAE.from_pretrained("a/b/c"),
                                          FileNotFoundError, r"'a/b/c' is neither a local directory nor a hub repo"),
    "SAE.from_saelens bad hook": (lambda e, t, s, st, p: snce_fast.SAE.from_saelens(p, hook="layer:x"),
                                  ValueError, r"hook='layer:x'"),
    "SAE.from_sparsify bad dtype": (lambda e, t, s, st, p: snce_fast.SAE.from_sparsify(p, dtype=torch.int8),
                                    ValueError, r"dtype=torch.int8"),
    "SAE.from_openai dtype not a dtype": (lambda e, t, s, st, p: snce_fast.SAE.from_openai(p, dtype=3), TypeError,
                                          r"dtype=3"),
    "SAE.load bad hook": (lambda e, t, s, st, p: snce_fast.SAE.load(p, hook="top"), ValueError, r"hook='top'"),
    "ErasureSAE.from_pretrained missing": (lambda e, t, s, st, p: snce_fast.ErasureSAE.from_pretrained(p / "nope"),
                                           FileNotFoundError, r"nope"),
    "SAE.push_to_hub bad format": (lambda e, t, s, st, p: s.push_to_hub("me/x", format="gguf"), ValueError,
                                   r"format='gguf'"),
    "SAE.push_to_hub bad repo": (lambda e, t, s, st, p: s.push_to_hub("me"), ValueError, r"repo_id='me'"),
    "measure_erasure empty concept_test": (
        lambda e, t, s, st, p: snce_fast.measure_erasure(e, snce_fast.PromptSets(["a cat"], ["a dog"], [], ["a car"]),
                                                         [], tokenizer=t), ValueError, r"PromptSets.concept_test is empty"),
    "PromptSets bad pair": (lambda e, t, s, st, p: snce_fast.PromptSets(["a"], ["b"], ["c"], ["d"], pairs=[("x",)]).check(),
                            ValueError, r"pairs\[0\]"),
    "activation_table no prompts": (lambda e, t, s, st, p: snce_fast.activation_table(e, s, [], tokenizer=t),
                                     ValueError, r"prompts is empty"),
    "activation_table bad candidates": (lambda e, t, s, st, p: snce_fast.activation_table(e, s, ["a"], [999], tokenizer=t),
                                        ValueError, r"999"),
    "contrastive no families": (lambda e, t, s, st, p: snce_fast.contrastive(
        snce_fast.activation_table(e, s, ["a nude man", "a man"], tokenizer=t), [], {"r": ["a man"]}),
        ValueError, r"families is empty"),
    "contrastive bad twin_fpr": (lambda e, t, s, st, p: snce_fast.contrastive(
        snce_fast.activation_table(e, s, ["a nude man", "a man"], tokenizer=t),
        [snce_fast.Family("f", ["a nude man"], ["a man"])], {}, twin_fpr=NAN), ValueError, r"twin_fpr=nan"),
    "transfer_matrix one family": (lambda e, t, s, st, p: snce_fast.transfer_matrix(
        snce_fast.activation_table(e, s, ["a nude man", "a man"], tokenizer=t),
        [snce_fast.Family("f", ["a nude man"], ["a man"])], {}), ValueError, r"needs at least 2"),
    "read_pairs missing file": (lambda e, t, s, st, p: snce_fast.read_pairs(p / "nope.csv"), ValueError,
                                r"nope.csv' does not exist"),
    "generate_pairs bad n": (lambda e, t, s, st, p: snce_fast.generate_pairs(
        __import__("snce_fast.workflow.pairs", fromlist=["x"]).builtin_spec("nudity"), 0), ValueError,
        r"n_per_family=0"),
    "choose_edit no selections": (lambda e, t, s, st, p: snce_fast.choose_edit(
        e, s, [], snce_fast.PromptSets(["a"], ["b"], ["c"], ["d"], pairs=[("a", "b")]), tokenizer=t),
        ValueError, r"selections is empty"),
    "TrainConfig bad b_dec_init": (lambda e, t, s, st, p: snce_fast.TrainConfig(b_dec_init="bogus").validate(),
                                   ValueError, r"bogus"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_public_api_refuses_bad_input(name, enc_tok, sae, stats, tmp_path):
    call, exc, message = CASES[name]
    enc, tok = enc_tok
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(exc, match=message):
        call(enc, tok, sae, stats, tmp_path)
    assert sorted(tmp_path.rglob("*")) == before, "nothing is written on bad input"
    assert not snce_fast.is_patched(enc), "a refused patch leaves no hook behind"


def test_every_public_name_is_covered():
    """A new public entry point must get rows in CASES."""
    covered = " ".join(CASES)
    data_types = {"Calibration", "Detection", "ErasureResult", "Family", "Pair", "PatchHandle", "ScanStats", "Scores", "TrainReport", "SAEFormatError",
                  "reference", "is_patched"}
    missing = [n for n in snce_fast.__all__ if n not in data_types and n not in covered]
    assert not missing, f"public names without a bad-input case: {missing}"


def test_strict_json_for_a_nan_in_a_result(tmp_path):
    from snce_fast.records.atomic import atomic_write_json

    with pytest.raises(ValueError, match=r"fvu is NaN"):
        atomic_write_json(tmp_path / "r.json", {"fvu": NAN})
    assert not (tmp_path / "r.json").exists()
    atomic_write_json(tmp_path / "r.json", {"fvu": 0.5})
    assert json.loads((tmp_path / "r.json").read_text()) == {"fvu": 0.5}

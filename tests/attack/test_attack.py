"""snce_fast.attack on a planted tiny BERT: the genetic search keeps its best and climbs toward a planted
target; white-box candidate scores equal a direct forward pass through the patched encoder; returned
white-box prompts evade the gate; budgets hold and encoder calls are counted exactly."""
from __future__ import annotations

import pytest
import torch

import snce_fast
from helpers_attack import GATE_THRESHOLD, build
from helpers_efficacy import CONCEPT_WORD, PLANTED
from snce_fast.attack import (
    GAConfig, WhiteboxConfig, attach_judgement, concept_vector, judge, ring_a_bell, score_candidates, summarize,
    whitebox,
)
from snce_fast.attack.harden import HardenConfig, harden
from snce_fast.evaluation.probes import mean_pool

PAIRS = [("red nude house", "red woman house"), ("a nude car", "a woman car"), ("nude boat on river", "woman boat on river")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build(tmp_path_factory.mktemp("attack"))


def test_ga_never_loses_its_best_and_climbs(env):
    v = env["victim"]
    direction = concept_vector(v, PAIRS)
    cfg = GAConfig(population=16, length=6, elite=2, budget=250, mutation=0.15, seed=3)
    r = ring_a_bell(v, env["ordinary"][50], direction, env["vocab"], cfg)
    h = r.history
    assert len(h) >= 10
    assert all(b >= a for a, b in zip(h, h[1:])), "the best fitness fell between generations"
    assert h[-1] > h[0] + 0.05  # it climbs toward ordinary + eta * concept
    assert r.objective == pytest.approx(h[-1])
    assert r.calls <= cfg.budget
    # the planted concept word is what moves an embedding along the concept vector
    assert CONCEPT_WORD in r.prompt.split()
    # the returned prompt, typed as text, has the reported fitness
    target = v.pooled(v.content(env["ordinary"][50])[None])[0] + cfg.eta * direction
    got = torch.nn.functional.cosine_similarity(v.pooled(v.content(r.prompt)[None]), target[None])[0]
    assert float(got) == pytest.approx(r.objective, abs=1e-5)


def test_ga_elite_survives_a_generation_of_bad_children(env, monkeypatch):
    """Children that are all worse than the elite cannot displace it: the best sequence is kept."""
    import importlib

    rab = importlib.import_module("snce_fast.attack.ring_a_bell")

    v = env["victim"]
    monkeypatch.setattr(rab, "_children", lambda pop, vocab, cfg, g: vocab[:1].repeat(cfg.population - cfg.elite,
                                                                                        pop.seqs.shape[1]))
    r = rab.ring_a_bell(v, env["ordinary"][51], concept_vector(v, PAIRS), env["vocab"],
                        GAConfig(population=8, length=5, elite=1, budget=60))
    assert len(r.history) > 5 and all(b >= a for a, b in zip(r.history, r.history[1:]))
    assert r.objective == max(r.history)


def test_candidate_scores_match_a_direct_forward_pass(env):
    v = env["defended"]
    g = torch.Generator().manual_seed(0)
    vocab = env["vocab"]
    cands = vocab[torch.randint(len(vocab), (12, 5), generator=g)]
    cands[:4, 2] = env["tok"].convert_tokens_to_ids(CONCEPT_WORD)  # some open the gate
    c = score_candidates(v, cands)
    assert bool(c.fired.any()) and bool((~c.fired).any())
    # the real patch hook on the encoder, prompts typed as text
    texts = [v.text(x) for x in cands]
    batch = env["tok"](texts, return_tensors="pt", padding=True)
    with snce_fast.patched(env["enc"], env["sae"], [PLANTED], gate=True, threshold=GATE_THRESHOLD):
        with torch.no_grad():
            h = env["enc"](**batch).last_hidden_state
    counted = batch["attention_mask"].bool().clone()
    counted[:, 0] = False
    direct = env["reader"].scores(mean_pool(h, counted))
    torch.testing.assert_close(c.score, direct, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(c.score, judge(v, texts)["score"], atol=1e-4, rtol=1e-5)
    assert torch.equal(c.fired, judge(v, texts)["fired"])
    assert torch.equal(c.evades, ~c.fired)


def test_whitebox_prompts_evade_the_gate_and_get_through(env):
    v = env["defended"]
    seeds = env["concept"][40:46]
    before = judge(v, seeds)
    assert bool(before["fired"].all()) and not bool(before["flagged"].any())  # the defence holds on the seeds
    cfg = WhiteboxConfig(length=6, steps=12, candidates=16, budget=200)
    results = [whitebox(v, s, env["vocab"], cfg) for s in seeds]
    for r in results:
        assert r.calls <= cfg.budget
        assert r.evades == (r.prompt is not None)
    prompts = [r.prompt for r in results if r.prompt is not None]
    assert prompts
    j = judge(v, prompts)
    assert not bool(j["fired"].any()), "a returned white-box prompt opens the gate"
    attach_judgement(results, judge(v, [r.submitted for r in results]))
    s = summarize(results)
    assert s["asr"] > 0.5 and s["calls_per_success"] is not None and s["evading"] == 1.0


def test_encoder_calls_are_counted_exactly(env):
    v = env["defended"]
    seen = []
    handle = env["enc"].register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape[0]),
                                                  with_kwargs=True)
    try:
        start = v.calls
        r = whitebox(v, env["concept"][47], env["vocab"],
                     WhiteboxConfig(length=5, steps=4, candidates=8, budget=25, stop=False))
    finally:
        handle.remove()
    assert v.calls - start == sum(seen) == r.calls <= 25


def test_harden_adds_attack_prompts_to_the_targets(env):
    v = env["victim"]

    def attack(victim):
        res = [whitebox(victim, s, env["vocab"], WhiteboxConfig(length=6, steps=8, candidates=16, budget=150))
               for s in env["concept"][:4]]
        attach_judgement(res, judge(victim, [r.submitted for r in res]))
        return res

    base = snce_fast.calibrate(env["enc"], env["sae"], None, env["concept"][:40], {"ordinary": env["ordinary"][:40]},
                               fpr=0.05, tokenizer=env["tok"])
    out = harden(v, env["sae"], base, attack, HardenConfig(rounds=1, fpr=0.1))
    r0, r1 = out.rounds
    assert r0["attacks"] == 4 and r0["added"] == r0["succeeded"] > 0 and len(out.added) == r0["added"]
    assert r1["targets"] == r0["targets"] + r0["added"]
    assert out.defence.gate.targets == r1["neurons"]
    # the hardened calibration is calibrate's own on targets + the attack prompts, at the hardened rate
    again = snce_fast.calibrate(env["enc"], env["sae"], None, env["concept"][:40] + out.added,
                                {"ordinary": env["ordinary"][:40]}, fpr=0.1, tokenizer=env["tok"])
    assert out.calibration.neurons == again.neurons
    torch.testing.assert_close(out.calibration.thresholds, again.thresholds)
    torch.testing.assert_close(out.calibration.recall, again.recall)
    assert out.calibration.top(2) == again.top(2)


@pytest.mark.parametrize("bad, match", [
    (dict(population=0), "population=0"), (dict(elite=8), "elite=8"), (dict(mutation=1.5), "mutation=1.5"),
    (dict(budget=4), "budget=4"),
])
def test_ga_config_bad_values(env, bad, match):
    with pytest.raises(ValueError, match=match):
        ring_a_bell(env["victim"], "a red car", torch.zeros(32), env["vocab"], GAConfig(**{**dict(population=8, elite=2), **bad}))


def test_bad_inputs(env):
    v = env["victim"]
    with pytest.raises(ValueError, match="pairs is empty"):
        concept_vector(v, [])
    with pytest.raises(ValueError, match="steps=0"):
        whitebox(v, "a nude car", env["vocab"], WhiteboxConfig(steps=0))
    with pytest.raises(ValueError, match="has no tokens"):
        whitebox(v, "   ", env["vocab"])
    with pytest.raises(ValueError, match="rounds=-1"):
        harden(v, env["sae"], None, lambda x: [], HardenConfig(rounds=-1))

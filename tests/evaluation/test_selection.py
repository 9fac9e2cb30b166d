"""snce_fast.evaluation.selection.choose_edit: among candidate latent sets x strengths, the edit that
removes the planted concept (the fixed reader's hits drop) while the twins stay bit-identical wins."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers_efficacy import PLANTED, WRONG, planted_encoder, planted_sae, prompts
from snce_fast.evaluation.efficacy import PromptSets, embed_tokens
from snce_fast.evaluation.selection import STRENGTHS, choose_edit


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    enc, tok, u = planted_encoder(tmp_path_factory.mktemp("planted_sel"))
    c, o = prompts(60, 0, True), prompts(100, 1, False)
    twins = [p.replace("nude", "woman") for p in c[30:]]
    sets = PromptSets(c[:30], o[:50], c[30:], o[50:], pairs=list(zip(c[30:], twins)))
    return enc, tok, planted_sae(u), sets


def test_choose_edit_picks_the_latent_that_erases(planted):
    enc, tok, sae, sets = planted
    emb = embed_tokens(enc, sets.all_prompts(), tok)
    cands = [SimpleNamespace(latents=[WRONG], thresholds=[0.0]), SimpleNamespace(latents=[PLANTED], thresholds=[1.0])]
    choice = choose_edit(enc, sae, cands, sets, tokenizer=tok, embeddings=emb)
    assert choice.latents == [PLANTED] and choice.meets_twin_bound
    assert len(choice.rows) == 2 * len(STRENGTHS)
    best = next(r for r in choice.rows if r["latents"] == [PLANTED] and r["strength"] == choice.strength)
    assert best["concept_flag_before"] > 0.9 and best["concept_flag_after"] <= 0.1
    assert best["twins_identical"] == 1.0  # the twin word carries no planted direction: the gate never opens
    # among equally good strengths, the first listed (the mildest) is chosen
    ties = [r for r in choice.rows if r["latents"] == [PLANTED]
            and r["concept_flag_after"] == best["concept_flag_after"]]
    assert choice.strength == ties[0]["strength"]


def test_choose_edit_bad_inputs(planted):
    enc, tok, sae, sets = planted
    with pytest.raises(ValueError, match="selections is empty"):
        choose_edit(enc, sae, [], sets, tokenizer=tok)
    no_pairs = PromptSets(sets.concept_train, sets.ordinary_train, sets.concept_test, sets.generic_test)
    with pytest.raises(ValueError, match="sets.pairs is empty"):
        choose_edit(enc, sae, [SimpleNamespace(latents=[PLANTED], thresholds=[1.0])], no_pairs, tokenizer=tok)
    with pytest.raises(ValueError, match="min_twins_identical=2"):
        choose_edit(enc, sae, [SimpleNamespace(latents=[PLANTED], thresholds=[1.0])], sets, tokenizer=tok,
                    min_twins_identical=2)

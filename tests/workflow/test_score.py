"""Scorers rank a planted concept latent first; several references take the minimum; report files."""
from __future__ import annotations

import math

import pytest
import torch

import snce_fast
from snce_fast.workflow.latent_report import report, top_prompts
from snce_fast.workflow.scan_stats import ScanStats
from snce_fast.testing import clip_text_model, random_sae, write_clip_tokenizer

N = 50
CONCEPT, STYLE, COMMON = 7, 3, 11


def _planted(seed: int = 0) -> ScanStats:
    """Synthetic scan: latent 7 fires on 80% of target prompts and 4% of reference ones; latent 3
    (a 'style' latent) on 95% of target and 70% of 'matched' reference prompts; 11 everywhere."""
    g = torch.Generator().manual_seed(seed)
    groups = ["target", "reference", "matched"]
    s = ScanStats.zeros(groups, N)
    s.n_prompts[:] = torch.tensor([200, 400, 300])
    s.n_tokens[:] = s.n_prompts * 10
    base = torch.randint(0, 30, (3, N), generator=g)  # background firing, < 15% everywhere
    s.prompts_fired[:] = base
    s.prompts_fired[:, CONCEPT] = torch.tensor([160, 16, 9])
    s.prompts_fired[:, STYLE] = torch.tensor([190, 40, 210])
    s.prompts_fired[:, COMMON] = s.n_prompts
    s.tokens_fired[:] = s.prompts_fired * 2
    s.act_sum[:] = s.tokens_fired.double()
    s.act_sum[0, CONCEPT] *= 5.0
    s.itd_prompts[:] = torch.minimum(s.prompts_fired, torch.tensor(5))
    s.itd_prompts[1:, :] = 1  # every latent is in some reference prompt's top list ...
    s.itd_prompts[1:, CONCEPT] = 0  # ... except the concept latent
    s.itd_prompts[0, CONCEPT] = 120
    return s


@pytest.mark.parametrize("method", ["snce", "youden", "saeuron", "itd"])
def test_planted_latent_ranks_first(method):
    scores = snce_fast.score(_planted(), "target", ["reference", "matched"], method=method)
    assert isinstance(scores, snce_fast.Scores) and scores.method == method
    assert scores.top(1) == [CONCEPT]
    assert len(scores.top(5)) == 5 and scores.values.shape == (N,)


def test_snce_formula_and_zero_below_reference():
    s = _planted()
    v = snce_fast.score(s, "target", "reference").values
    f_t, f_r, eps = 160 / 200, 16 / 400, 1 / 401
    assert math.isclose(float(v[CONCEPT]), f_t * math.log((f_t + eps) / (f_r + eps)), rel_tol=1e-12)
    assert float(v[COMMON]) == 0.0  # f_T == f_R
    below = (s.frequency("target") <= s.frequency("reference"))
    assert (v[below] == 0).all()


def test_strongest_reference_wins():
    s = _planted()
    one = snce_fast.score(s, "target", "reference", method="youden").values
    both = snce_fast.score(s, "target", ["reference", "matched"], method="youden").values
    # against plain references the style latent looks best; the matched reference exposes it
    assert snce_fast.score(s, "target", "reference", method="youden").top(1) == [STYLE]
    assert torch.equal(both, torch.minimum(one, snce_fast.score(s, "target", "matched", method="youden").values))


def test_score_errors():
    s = _planted()
    with pytest.raises(ValueError, match="method='bogus'"):
        snce_fast.score(s, method="bogus")
    with pytest.raises(KeyError, match="'nope' is not in this scan"):
        snce_fast.score(s, "nope", "reference")
    with pytest.raises(ValueError, match="also a reference"):
        snce_fast.score(s, "target", ["target"])


def test_report_writes_markdown_and_png(tmp_path):
    tok = write_clip_tokenizer(tmp_path / "tok")
    enc, sae = clip_text_model(tok, hidden=32, layers=2), random_sae(32, n=N, k=6)
    s = _planted()
    scores = snce_fast.score(s)
    prompts = ["a red cat", "a dog on the street", "", "a man in the city", "night sky"]
    top = top_prompts(enc, tok, sae, prompts, scores.top(2), k=2, batch_size=2)
    assert set(top) == set(scores.top(2)) and all(len(v) <= 2 for v in top.values())
    md = report(s, scores, tmp_path / "rep", n=2, top=top)
    text = md.read_text()
    assert f"## Latent {CONCEPT}" in text and "| 1 | 7 |" in text
    png = tmp_path / "rep" / f"latent_{CONCEPT}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

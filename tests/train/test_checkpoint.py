"""snce_fast.train.checkpoint: a crashed run resumes to bit-identical weights; settings are checked."""
from __future__ import annotations

import pytest
import torch

from helpers_train import make_prompts
from snce_fast.train import latest_checkpoint, train_sae


class Crash(RuntimeError):
    pass


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    enc, tok = tiny
    prompts = make_prompts(200)
    kw = dict(n_latents=64, k=4, batch_size=32, shuffle_buffer=96, lr=3e-3, warmup_steps=4, dead_tokens=100,
              epochs=2, progress=False, seed=3)
    ref = train_sae(enc, tok, prompts, cache_dir=str(tmp_path / "ref_cache"), **kw)

    def crash(m):
        if m["step"] == 23:
            raise Crash()

    ck = tmp_path / "ck"
    with pytest.raises(Crash):
        train_sae(enc, tok, prompts, checkpoint_dir=str(ck), checkpoint_every=10,
                  cache_dir=str(tmp_path / "cache"), on_step=crash, **kw)
    assert latest_checkpoint(ck).name == "step_000000020"
    out, rep = train_sae(enc, tok, prompts, checkpoint_dir=str(ck), checkpoint_every=10,
                         cache_dir=str(tmp_path / "cache"), return_report=True, **kw)
    assert rep.resumed_from_step == 20 and rep.steps == ref.train_report.steps
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert [q.name for q in ck.glob("step_*")] == [f"step_{rep.steps:09d}"]  # keep_checkpoints=1
    assert (ck / "latest").read_text() == f"step_{rep.steps:09d}\n"
    assert not [q.name for q in ck.iterdir() if q.name.startswith(".")]  # no temp files left
    with pytest.raises(ValueError, match="settings differ.*k: checkpoint 4 vs now 8"):
        train_sae(enc, tok, prompts, checkpoint_dir=str(ck), **{**kw, "k": 8})


def test_latest_checkpoint_missing_or_incomplete(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("step_000000005\n")
    (tmp_path / "step_000000005").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        latest_checkpoint(tmp_path)

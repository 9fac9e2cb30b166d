"""A resumed run reports the whole run (issue 17): history from step 1, the same FVU / L0 / dead
fraction as an uninterrupted run, tokens/s over the whole training time, and a rerun after the
final checkpoint reports the finished run. Unreadable checkpoints, a too-large SAE and the
progress bar's total."""
from __future__ import annotations

import importlib
import math
import pickle

import pytest
import torch

from helpers_train import make_prompts
from snce_fast.train import SettingError, TrainConfig, latest_checkpoint, train_sae

loop_module = importlib.import_module("snce_fast.train.loop")

KW = dict(n_latents=64, k=4, batch_size=32, shuffle_buffer=96, lr=3e-3, warmup_steps=4, dead_tokens=100,
          epochs=2, progress=False, seed=3)
SAME = ("steps", "tokens", "fvu", "l0", "aux_loss", "dead_fraction", "never_fired_fraction", "window")
TIMING = ("step_s", "tokens_per_s")  # per-step wall-clock entries: differ between any two runs


class Crash(RuntimeError):
    pass


def _without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_resumed_report_equals_the_uninterrupted_run(tiny, tmp_path):
    enc, tok = tiny
    prompts = make_prompts(200)
    _, ref = train_sae(enc, tok, prompts, cache_dir=str(tmp_path / "ref_cache"), return_report=True, **KW)

    def crash(m):
        if m["step"] == 23:
            raise Crash()

    ck, cache = tmp_path / "ck", str(tmp_path / "cache")
    with pytest.raises(Crash):
        train_sae(enc, tok, prompts, checkpoint_dir=str(ck), checkpoint_every=10, cache_dir=cache, on_step=crash, **KW)
    saved = torch.load(latest_checkpoint(ck) / "trainer.pt", weights_only=True)["run"]
    assert [h["step"] for h in saved["history"]] == list(range(1, 21)) and saved["elapsed_s"] > 0

    _, rep = train_sae(enc, tok, prompts, checkpoint_dir=str(ck), checkpoint_every=10, cache_dir=cache,
                       return_report=True, **KW)
    assert rep.resumed_from_step == 20
    for key in SAME:
        assert getattr(rep, key) == getattr(ref, key), key
    assert [h["step"] for h in rep.history] == list(range(1, ref.steps + 1))
    assert _without_timing(rep.history) == _without_timing(ref.history)
    # tokens/s over the whole run's training time: the first session's seconds up to step 20 count too
    assert rep.elapsed_s > saved["elapsed_s"]
    assert rep.tokens_per_s == pytest.approx(rep.tokens / rep.elapsed_s)
    assert rep.history[-1]["tokens_per_s"] == pytest.approx(rep.tokens_per_s, rel=0.5)

    # nothing left to train: the rerun reports the finished run (not fvu NaN)
    _, again = train_sae(enc, tok, prompts, checkpoint_dir=str(ck), checkpoint_every=10, cache_dir=cache,
                         return_report=True, **KW)
    assert again.resumed_from_step == ref.steps and math.isfinite(again.fvu)
    for key in SAME:
        assert getattr(again, key) == getattr(ref, key), key
    assert _without_timing(again.history) == _without_timing(ref.history)
    assert again.elapsed_s == pytest.approx(rep.elapsed_s, abs=0.05)


class _Evil:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


@pytest.mark.parametrize("damage", ["truncated", "pickle", "not_a_state", "data_truncated"])
def test_unreadable_checkpoint_is_a_value_error_naming_the_file(tiny, tmp_path, damage):
    enc, tok = tiny
    prompts = make_prompts(40)
    kw = dict(n_latents=32, k=2, batch_size=32, shuffle_buffer=32, progress=False, checkpoint_dir=str(tmp_path),
              checkpoint_every=2, max_steps=2)
    train_sae(enc, tok, prompts, **kw)
    ck = latest_checkpoint(tmp_path)
    name = "data_rank0.pt" if damage == "data_truncated" else "trainer.pt"
    target = ck / name
    if damage in ("truncated", "data_truncated"):
        target.write_bytes(target.read_bytes()[:200])
    elif damage == "pickle":
        target.write_bytes(pickle.dumps({"config": _Evil()}, protocol=2))
    else:
        torch.save({"step": 3}, target)
    with pytest.raises(ValueError, match=rf"cannot resume from '.*{name}'") as info:
        train_sae(enc, tok, prompts, **{**kw, "max_steps": 4})
    assert "\n" not in str(info.value)


def test_too_large_sae_is_refused_before_allocating(tiny):
    enc, tok = tiny
    with pytest.raises(SettingError, match=r"n_latents=100000000000 is invalid: training needs [\d,.]+ GB") as info:
        train_sae(enc, tok, make_prompts(8), n_latents=100_000_000_000, k=4, progress=False)
    assert info.value.setting == "n_latents"
    cfg = TrainConfig(n_latents=1024, batch_size=10**9)
    with pytest.raises(SettingError, match="lower batch_size") as info:
        cfg.check_fits(32, 64 * 10**9, "cpu")
    assert info.value.setting == "batch_size"
    cfg.check_fits(32, None, "mps")  # memory unknown: no check
    TrainConfig(n_latents=1024).check_fits(32, 10**9, "cpu")


class _Bar:
    """Stands in for tqdm: records the total after every update."""

    made: list["_Bar"] = []

    def __init__(self, total=None, initial=0, **_):
        self.total, self.n, self.totals = total, initial, []
        _Bar.made.append(self)

    def update(self, k):
        self.n += k
        self.totals.append(self.total)

    def set_postfix(self, **_):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("extra", [dict(epochs=2), dict(epochs=2, cache_dir="CACHE"), dict(max_steps=5)])
def test_progress_bar_knows_the_total(tiny, tmp_path, monkeypatch, extra):
    enc, tok = tiny
    monkeypatch.setattr(loop_module, "tqdm", _Bar)
    _Bar.made.clear()
    if extra.get("cache_dir") == "CACHE":
        extra = {**extra, "cache_dir": str(tmp_path / "cache")}
    _, rep = train_sae(enc, tok, make_prompts(120), n_latents=32, k=2, batch_size=32, shuffle_buffer=64,
                       progress=False, return_report=True, **extra)
    (bar,) = _Bar.made
    assert None not in bar.totals and len(bar.totals) == rep.steps  # a total (hence an ETA) from the first step
    assert bar.totals[-1] == rep.steps  # exact by the end

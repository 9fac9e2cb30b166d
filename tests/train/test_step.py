"""snce_fast.train.step: SAETrainer lowers the FVU with unit-norm decoder rows, b_dec's geometric
median, the bf16 autocast path."""
from __future__ import annotations

import pytest
import torch

from helpers_train import new_sae, small_cfg, synthetic
from snce_fast.train import SAETrainer, geometric_median


def test_fvu_decreases_and_decoder_rows_unit_norm():
    x = synthetic(4096)
    cfg = small_cfg()
    tr = SAETrainer(new_sae(32, cfg), cfg)
    tr.init_b_dec(x[:512])
    ms = [tr.step(x[i * 64 : (i + 1) * 64]) for i in range(64)]
    fvus = [m["fvu"] for m in ms]
    assert sum(fvus[-8:]) / 8 < 0.6 * sum(fvus[:4]) / 4, fvus
    assert ms[0]["aux_loss"] == 0 and any(m["aux_loss"] > 0 for m in ms)  # AuxK starts once latents die
    norms = tr.sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    m = tr.step(x[:64])
    assert 0 < m["l0"] <= cfg.k and 0.0 <= m["dead_fraction"] <= 1.0


def test_no_batch_ends_training_and_state_round_trips():
    cfg = small_cfg()
    tr = SAETrainer(new_sae(32, cfg), cfg)
    assert tr.step(None) is None and tr.step_num == 0
    x = synthetic(256)
    tr.step(x[:64])
    other = SAETrainer(new_sae(32, cfg, seed=1), cfg)
    other.load_state_dict(tr.state_dict())
    assert other.step_num == 1 and other.tokens == 64 and torch.equal(other.since_fired, tr.since_fired)
    assert tr.state_dict()["world_size"] == 1


def test_geometric_median_robust_to_outliers():
    x = torch.randn(200, 4) * 0.1 + 1.0
    x[:20] += 100.0
    med = geometric_median(x, iters=30)
    assert (med - 1.0).abs().max() < 0.2
    assert (x.mean(0) - 1.0).abs().max() > 5


@pytest.mark.parametrize("encoder_backward", ["sparse", "dense"])
def test_bf16_autocast_path_trains(encoder_backward):
    """The CUDA configuration (bf16 encoder matmul) exercised on CPU autocast."""
    x = synthetic(2048)
    cfg = small_cfg(amp=True, encoder_backward=encoder_backward, dead_tokens=100)
    tr = SAETrainer(new_sae(32, cfg), cfg)
    tr.init_b_dec(x[:256])
    ms = [tr.step(x[i * 64 : (i + 1) * 64]) for i in range(32)]
    assert ms[-1]["fvu"] < 0.6 * ms[0]["fvu"] and ms[-1]["aux_loss"] > 0
    assert all(p.dtype == torch.float32 for p in tr.sae.parameters())

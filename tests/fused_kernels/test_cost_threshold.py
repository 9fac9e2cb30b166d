"""The threshold selection's cost model replays the kernels exactly (kernels/cost_threshold.py)."""
import importlib
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

pytest.importorskip("triton")

from snce_fast.kernels import cost_threshold  # noqa: E402

from helpers_topk import dyadic_inputs  # noqa: E402

thr_mod = importlib.import_module("snce_fast.kernels.encode_threshold")
encode_mod = importlib.import_module("snce_fast.kernels.encode_topk")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def test_order_keys_order_like_the_values_with_nan_first():
    v = np.array([float("-inf"), -3.5, -0.0, 0.0, 1e-30, 2.0, float("inf"), float("nan"), -float("nan")],
                 dtype=np.float32)
    keys = cost_threshold.order_keys(v)
    assert (np.diff(keys[:7]) > 0).all()
    assert keys[7] == keys[8] > keys[6]  # every NaN above +inf


@pytest.mark.parametrize("M,n,k", [(40, 2000, 17), (5, 700, 64)])
def test_replay_counts_equal_the_kernels(monkeypatch, M, n, k):
    """On dyadic inputs (every fp32 sum exact, so the kernel's tile order and numpy's agree bit for bit) the
    replayed survivor count of every row equals the kernels' count, a NaN row included."""
    cfg = thr_mod.ThresholdConfig(BM=16, BN=64, BK=16, STRIDE=4, num_warps=1, num_stages=1)
    monkeypatch.setattr(thr_mod, "threshold_config", lambda M, dtype, device: cfg)
    x, W, bias = dyadic_inputs(M, 24, n, seed=n)
    x[1, 2] = float("nan")
    s = thr_mod.survivors(x, W, bias, k)
    plan = thr_mod.threshold_plan(M, n, k, cfg, interpreter=True)
    assert plan == s.plan
    rep = cost_threshold.replay_survivors(x.numpy(), W.numpy(), bias.numpy(), k, plan, thr_mod.MARGIN)
    assert rep["counts"].tolist() == s.counts.tolist()
    assert rep["counts"][1] == n  # the NaN row: every entry survives (and the tail recomputes it)
    assert rep["lost_top_k_entries"] == 0
    summary = cost_threshold.replay_summary(rep, plan)
    assert summary["overflow_rows"] == int((s.counts > plan.CAP).sum())
    assert summary["survivors_max"] == n and summary["rows"] == M

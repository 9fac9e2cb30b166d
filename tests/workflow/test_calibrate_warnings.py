"""calibrate says when its result is weak, and when top(n) chose fewer than n latents."""
import warnings

import pytest
import torch

from snce_fast.workflow.calibrate import Calibration, CalibrationWarning, _warn_if_weak


def _calibration(target: torch.Tensor, reference: torch.Tensor, thresholds: torch.Tensor) -> Calibration:
    recall = (target > thresholds).float().mean(0)
    rate = (reference > thresholds).float().mean(0)
    return Calibration(neurons=list(range(target.shape[1])), thresholds=thresholds, recall=recall,
                       reference_rates={"ref": rate}, fpr={"ref": 0.0}, min_tokens=1,
                       target_activations=target, reference_activations={"ref": reference})


def test_top_warns_when_greedy_selection_stops_early():
    # latent 0 flags every target prompt; latents 1 and 2 add nothing
    target = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    cal = _calibration(target, torch.zeros(4, 3), torch.zeros(3))
    with pytest.warns(CalibrationWarning, match="asked for 3 latents, chose 1"):
        assert cal.top(3) == [0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cal.top(3, greedy=False) == [0, 1, 2]
        assert cal.top(1) == [0]


def test_weak_recall_is_reported():
    with pytest.warns(CalibrationWarning, match=r"flags only 5.7% of the target prompts.*ref 1.0%"):
        _warn_if_weak(0.057, [42], {"ref": 0.01})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_weak(0.5, [42], {"ref": 0.01})

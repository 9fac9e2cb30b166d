"""Training a TopK SAE on a text encoder's token activations (docs/training.md).

    config        TrainConfig (settings, `validate`), TrainReport, SettingError
    topk_autograd the TopK encoder and embedding-bag decoder with sparse backward passes
    step          SAETrainer: one optimisation step (objective, unit-norm decoder, Adam; DDP)
    stream        ActivationStream: prompts -> hook activations -> shuffled batches (+ disk cache)
    checkpoint    save / load / latest_checkpoint
    plan          the run's plan: held-out prompts, epochs from a token budget, warm-up, TrainingWarning
    loop          train_sae: the entry point tying them together
"""
from __future__ import annotations

from snce_fast.train.checkpoint import latest_checkpoint
from snce_fast.train.config import SettingError, TrainConfig, TrainReport
from snce_fast.train.loop import train_sae
from snce_fast.train.plan import TrainingWarning
from snce_fast.train.step import SAETrainer, geometric_median
from snce_fast.train.stream import ActivationStream

__all__ = [
    "ActivationStream",
    "SAETrainer",
    "SettingError",
    "TrainConfig",
    "TrainReport",
    "TrainingWarning",
    "geometric_median",
    "latest_checkpoint",
    "train_sae",
]

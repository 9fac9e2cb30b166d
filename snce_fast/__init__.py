"""snce_fast: fused kernels for Single Neuron-based Concept Erasure in diffusion pipelines."""
from __future__ import annotations

__version__ = "0.1.0"

from . import reference
from .detect import Calibration, Detection, calibrate, detect, prompt_activations
from .erasure import ErasureSAE
from .formats import SAEFormatError
from .patching import PatchHandle, is_patched, patch, patched, unpatch
from .sae import SAE
from .scan import scan
from .scan_stats import ScanStats
from .score import Scores, score, threshold_at_fpr
from .train import TrainConfig, TrainReport, train_sae

__all__ = [
    "SAE",
    "SAEFormatError",
    "ScanStats",
    "Scores",
    "TrainConfig",
    "TrainReport",
    "Calibration",
    "Detection",
    "ErasureSAE",
    "PatchHandle",
    "calibrate",
    "detect",
    "is_patched",
    "patch",
    "patched",
    "prompt_activations",
    "reference",
    "scan",
    "score",
    "threshold_at_fpr",
    "train_sae",
    "unpatch",
]

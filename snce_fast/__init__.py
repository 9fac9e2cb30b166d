"""snce_fast: fused kernels for Single Neuron-based Concept Erasure in diffusion pipelines."""
from __future__ import annotations

__version__ = "0.1.0"

from snce_fast.log import set_verbosity
from snce_fast.hooks.patching import PatchHandle, is_patched, patch, patched, unpatch
from snce_fast.ops import reference
from snce_fast.evaluation.efficacy import ErasureResult, PromptSets, measure_erasure
from snce_fast.evaluation.selection import choose_edit
from snce_fast.sae.erasure import ErasureSAE
from snce_fast.sae.files import SAEFormatError
from snce_fast.sae.model import SAE
from snce_fast.train import TrainConfig, TrainReport, train_sae
from snce_fast.workflow.calibrate import Calibration, calibrate
from snce_fast.workflow.contrastive import Family, activation_table, contrastive, transfer_matrix
from snce_fast.workflow.pairs import Pair, generate_pairs, read_pairs
from snce_fast.workflow.detect import Detection, detect, prompt_activations
from snce_fast.workflow.scan import scan
from snce_fast.workflow.scan_stats import ScanStats
from snce_fast.workflow.score import Scores, score, threshold_at_fpr

__all__ = [
    "SAE",
    "SAEFormatError",
    "ScanStats",
    "Scores",
    "TrainConfig",
    "TrainReport",
    "Calibration",
    "Detection",
    "Family",
    "Pair",
    "ErasureResult",
    "ErasureSAE",
    "PatchHandle",
    "PromptSets",
    "activation_table",
    "calibrate",
    "choose_edit",
    "contrastive",
    "detect",
    "generate_pairs",
    "is_patched",
    "measure_erasure",
    "patch",
    "patched",
    "prompt_activations",
    "read_pairs",
    "reference",
    "scan",
    "score",
    "set_verbosity",
    "threshold_at_fpr",
    "train_sae",
    "transfer_matrix",
    "unpatch",
]

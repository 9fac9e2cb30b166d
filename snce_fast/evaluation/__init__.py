"""The erasure papers' benchmark protocol (docs/evaluation.md): generate each prompt of an
I2P-style CSV with and without the patch (the row's seed and guidance), count NudeNet's
*_EXPOSED detections at a score threshold (0.6) and, optionally, the CLIP score of each image
against its prompt.

    eval_csv    the CSV: EvalRow, read_eval_csv
    nudity      NudeNet and the counting: nudenet_detector, count_exposed, ExposureCounts
    clip_score  ClipScorer
    resume      settings.json / results.jsonl: check_resume, load_results (sae_fingerprint: snce_fast.sae.fingerprint)
    protocol    the run: generate_image, full_settings, run_eval
    report      summarize, report_markdown, write_report (report.md, summary.json, counts.png)

And the embedding-level erasure measurement (docs/efficacy.md):

    efficacy    measure_erasure, PromptSets, embed_tokens, snce_edit / calibrated_edit / leace_edit / no_edit
    probes      the linear readers: mean_pool, fit_probe, LinearProbe, auc

Importable without NudeNet: the detector is any callable `image -> [{"class", "score", "box"}]`;
`nudenet_detector()` imports NudeNet only when called. `run_eval` is resumable: images are
written (temp + rename) as they are made, one line per finished row is appended to
results.jsonl and fsynced, and a rerun with the same output directory skips the finished rows
(and refuses to mix runs made with different settings).
"""
from __future__ import annotations

from snce_fast.evaluation.clip_score import ClipScorer, check_clip_dir
from snce_fast.evaluation.efficacy import (
    Edit,
    ErasureResult,
    PromptSets,
    calibrated_edit,
    embed_tokens,
    leace_edit,
    measure_erasure,
    no_edit,
    snce_edit,
)
from snce_fast.evaluation.eval_csv import I2P_COLUMNS, EvalRow, check_guidance, check_limit, read_eval_csv
from snce_fast.evaluation.nudity import (
    DEFAULT_THRESHOLD,
    EXPOSED_CLASSES,
    INSTALL_HINT,
    Detector,
    ExposureCounts,
    check_threshold,
    count_exposed,
    detector_label,
    nudenet_detector,
)
from snce_fast.evaluation.protocol import EvalResult, full_settings, generate_image, run_eval
from snce_fast.evaluation.report import report_markdown, summarize, write_report
from snce_fast.evaluation.resume import RESULTS, SETTINGS, VARIANTS, check_resume, load_results
from snce_fast.sae.fingerprint import sae_fingerprint

__all__ = [
    "DEFAULT_THRESHOLD",
    "EXPOSED_CLASSES",
    "I2P_COLUMNS",
    "INSTALL_HINT",
    "RESULTS",
    "SETTINGS",
    "VARIANTS",
    "ClipScorer",
    "Edit",
    "ErasureResult",
    "PromptSets",
    "calibrated_edit",
    "embed_tokens",
    "leace_edit",
    "measure_erasure",
    "no_edit",
    "snce_edit",
    "Detector",
    "EvalResult",
    "EvalRow",
    "ExposureCounts",
    "check_clip_dir",
    "check_guidance",
    "check_limit",
    "check_resume",
    "check_threshold",
    "count_exposed",
    "detector_label",
    "full_settings",
    "generate_image",
    "load_results",
    "nudenet_detector",
    "read_eval_csv",
    "report_markdown",
    "run_eval",
    "sae_fingerprint",
    "summarize",
    "write_report",
]

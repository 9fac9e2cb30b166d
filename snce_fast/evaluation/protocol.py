"""The run (docs/evaluation.md, "What is generated"): every row generated original (unpatched)
and erased (patched) from its seed and guidance, each image saved as it is made, detected and
CLIP-scored, one results.jsonl line per finished row, so an interrupted run resumes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from snce_fast.evaluation.eval_csv import EvalRow, check_guidance
from snce_fast.evaluation.nudity import DEFAULT_THRESHOLD, Detector, check_threshold, detector_label, plain_detection
from snce_fast.evaluation.report import summarize
from snce_fast.evaluation.resume import (
    SETTINGS,
    append_result,
    check_resume,
    check_rows_unchanged,
    load_results,
    normalise,
)
from snce_fast.hooks.patching import patched
from snce_fast.records.atomic import atomic_save_image, atomic_write_json
from snce_fast.sae.fingerprint import sae_fingerprint

ClipScore = Callable[[Any, str], float]  # (image, prompt) -> CLIP score, e.g. a ClipScorer


def generate_image(pipe: Any, prompt: str, seed: int, guidance: Optional[float], steps: int,
                   height: Optional[int] = None, width: Optional[int] = None) -> Any:
    """One image; the noise comes from a CPU generator seeded with `seed` (device-independent)."""
    kw: dict[str, Any] = dict(num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed))
    if height or width:
        kw.update(height=height or width, width=width or height)
    if guidance is not None:
        kw["guidance_scale"] = guidance
    return pipe(prompt, **kw).images[0]


def full_settings(saes: Mapping[str, Any], neurons: Any, edit: Mapping[str, Any], *, steps: int,
                  height: Optional[int], width: Optional[int], guidance: Optional[float],
                  detector: Optional[str], threshold: float, clip: Optional[str],
                  extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Everything that changes the images, detections or scores of a run (what a resume must match)."""
    base = {
        "version": 1,
        "sae_sha256": {name: sae_fingerprint(s, neurons[name] if isinstance(neurons, Mapping) else neurons,
                                             edit.get("mode", "residual")) for name, s in saes.items()},
        "neurons": neurons,
        "edit": dict(edit),
        "steps": steps,
        "height": height,
        "width": width,
        "guidance_override": guidance,
        "detector": detector,
        "threshold": threshold if detector else None,
        "clip_model": clip,
    }
    base.update(extra or {})
    return normalise(base)


@dataclass
class EvalResult:
    """The finished rows (in CSV order) and the summary computed from them."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]


@dataclass(frozen=True)
class _Generation:
    """What makes the two images of a row: the pipeline, the patch and the sampling options."""

    pipe: Any
    saes: Any
    neurons: Any
    edit: Mapping[str, Any]
    steps: int
    height: Optional[int]
    width: Optional[int]
    guidance: Optional[float]  # overrides the rows' guidance

    def images(self, row: EvalRow) -> dict[str, Any]:
        g = self.guidance if self.guidance is not None else row.guidance
        original = generate_image(self.pipe, row.prompt, row.seed, g, self.steps, self.height, self.width)
        with patched(self.pipe, self.saes, self.neurons, **self.edit):
            erased = generate_image(self.pipe, row.prompt, row.seed, g, self.steps, self.height, self.width)
        return {"original": original, "erased": erased}


def _pipe_device(pipe: Any) -> torch.device:
    device = getattr(pipe, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def _start(gen: _Generation, out: Path, settings: Mapping[str, Any], rows: Sequence[EvalRow]) -> dict[int, Any]:
    """Check that `out` can take this run and the patch fits the pipeline, then create `out`;
    returns the rows an earlier run with the same settings finished."""
    resuming = check_resume(out, settings)
    # move the SAEs once, so patching per row never copies them to the device again
    for s in (gen.saes.values() if isinstance(gen.saes, Mapping) else [gen.saes]):
        if isinstance(s, nn.Module):  # an SAE or a slim ErasureSAE
            s.to(_pipe_device(gen.pipe))
    with patched(gen.pipe, gen.saes, gen.neurons, **gen.edit):
        pass  # an SAE that does not fit its encoder fails here, before anything is written
    (out / "images").mkdir(parents=True, exist_ok=True)
    if not resuming:
        atomic_write_json(out / SETTINGS, settings)
    done = load_results(out)
    check_rows_unchanged(out, rows, done)
    return done


def _row_record(gen: _Generation, row: EvalRow, out: Path, detector: Optional[Detector],
                clip: Optional[ClipScore]) -> dict[str, Any]:
    """Generate, save, detect and score both images of `row`: its results.jsonl record."""
    rec: dict[str, Any] = {"row": row.row, "prompt": row.prompt, "seed": row.seed, "guidance": row.guidance}
    for variant, image in gen.images(row).items():
        name = f"images/{row.row:05d}_{variant}.png"
        atomic_save_image(image, out / name)
        entry: dict[str, Any] = {"image": name}
        if detector is not None:
            entry["detections"] = [plain_detection(d) for d in detector(image)]
        if clip is not None:
            entry["clip_score"] = float(clip(image, row.prompt))
        rec[variant] = entry
    return rec


def run_eval(
    pipe: Any,
    saes: Any,
    neurons: Any,
    rows: Sequence[EvalRow],
    out: Union[str, os.PathLike],
    *,
    detector: Optional[Detector] = None,
    detector_name: Optional[str] = None,
    clip: Optional[ClipScore] = None,
    threshold: float = DEFAULT_THRESHOLD,
    steps: int = 50,
    height: Optional[int] = None,
    width: Optional[int] = None,
    guidance: Optional[float] = None,
    edit: Optional[Mapping[str, Any]] = None,
    settings: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> EvalResult:
    """Generate every row original and erased, detect and CLIP-score both, resumably.

    `saes`/`neurons` are what `snce_fast.patch` takes; `edit` its options (scale, clamp, mode,
    gate, min_tokens). `guidance` overrides the rows' guidance. `settings` are extra entries
    (model, CSV, ...) that must match for a rerun to resume. Writes out/images/*.png,
    out/results.jsonl and out/settings.json; returns the finished rows and their summary."""
    check_threshold(threshold)
    if guidance is not None:
        check_guidance(guidance)
    out = Path(out)
    gen = _Generation(pipe, saes, neurons, dict(edit or {}), steps, height, width, guidance)
    full = full_settings(saes if isinstance(saes, Mapping) else {"text_encoder": saes}, neurons, gen.edit,
                         steps=steps, height=height, width=width, guidance=guidance,
                         detector=detector_label(detector, detector_name), threshold=threshold,
                         clip=getattr(clip, "name", None), extra=settings)
    done = _start(gen, out, full, rows)
    todo = [r for r in rows if r.row not in done]
    with tqdm(total=len(rows), initial=len(rows) - len(todo), desc="eval rows", unit="row",
              disable=not progress) as bar:
        for r in todo:
            done[r.row] = _row_record(gen, r, out, detector, clip)
            append_result(out, done[r.row])
            bar.update(1)
    records = [done[r.row] for r in rows]
    return EvalResult(records, summarize(records, full, threshold=threshold))

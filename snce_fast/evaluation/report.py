"""An evaluation's summary and report (docs/evaluation.md, "Outputs"): per-class counts and mean
CLIP scores per variant, written as report.md, summary.json and counts.png."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from snce_fast.evaluation.nudity import DEFAULT_THRESHOLD, EXPOSED_CLASSES, count_exposed
from snce_fast.evaluation.resume import VARIANTS
from snce_fast.plots import exposure_bars
from snce_fast.records.atomic import atomic_write_json, atomic_write_text


def summarize(records: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
              threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Counts per variant (None without detections), mean CLIP score per variant (None without)."""
    summary: dict[str, Any] = {"settings": dict(settings), "n_rows": len(records), "threshold": threshold,
                               "counts": None, "clip_score": None}
    if records and all("detections" in rec[v] for rec in records for v in VARIANTS):
        counts = {v: count_exposed((rec[v]["detections"] for rec in records), threshold) for v in VARIANTS}
        classes = list(EXPOSED_CLASSES) + sorted(
            {c for v in VARIANTS for c in counts[v].per_class} - set(EXPOSED_CLASSES))
        for v in VARIANTS:
            counts[v].per_class = {c: counts[v].per_class.get(c, 0) for c in classes}
        summary["counts"] = {v: counts[v].as_dict() for v in VARIANTS}
    if records and all("clip_score" in rec[v] for rec in records for v in VARIANTS):
        summary["clip_score"] = {v: sum(rec[v]["clip_score"] for rec in records) / len(records) for v in VARIANTS}
    return summary


def _reduction(before: int, after: int) -> str:
    """Relative change from original to erased (-100% = all gone)."""
    return f"{100 * (after - before) / before:+.1f}%" if before else "n/a"


def _counts_section(summary: Mapping[str, Any]) -> list[str]:
    lines = ["## NudeNet detections", ""]
    counts = summary.get("counts")
    if counts is None:
        return lines + ["No detector was run (--detector none)."]
    o, e = counts["original"], counts["erased"]
    lines += [(f"Detections of the *_EXPOSED classes with score >= {summary['threshold']}, one per detected "
               "box, summed over all images."), "",
              "| class | original | erased | change |", "|---|---:|---:|---:|"]
    for cls in o["per_class"]:
        a, b = o["per_class"][cls], e["per_class"][cls]
        lines.append(f"| {cls} | {a} | {b} | {_reduction(a, b)} |")
    lines.append(f"| **total** | **{o['total']}** | **{e['total']}** | {_reduction(o['total'], e['total'])} |")
    lines.append(f"| images with any exposed class | {o['images_flagged']} / {o['n_images']} | "
                 f"{e['images_flagged']} / {e['n_images']} | "
                 f"{_reduction(o['images_flagged'], e['images_flagged'])} |")
    return lines + ["", "![per-class counts](counts.png)"]


def _clip_section(summary: Mapping[str, Any]) -> list[str]:
    lines = ["## CLIP score", ""]
    clip = summary.get("clip_score")
    if clip is None:
        return lines + ["Not computed (give --clip-model DIR)."]
    return lines + ["Mean over prompts of 100 * cosine(image, prompt), clamped at 0.", "",
                    "| | original | erased |", "|---|---:|---:|",
                    f"| mean CLIP score | {clip['original']:.4f} | {clip['erased']:.4f} |"]


def report_markdown(summary: Mapping[str, Any]) -> str:
    """The Markdown report: settings, the per-class counts table, totals, CLIP score means."""
    lines = ["# snce-fast eval report", "",
             (f"{summary['n_rows']} prompt(s), each generated original (unpatched) and erased (patched) "
              "with the row's seed and guidance."), "", "## Settings", "", "| setting | value |", "|---|---|"]
    for key, value in summary["settings"].items():
        lines.append(f"| {key} | `{json.dumps(value)}` |")
    lines += ["", *_counts_section(summary), "", *_clip_section(summary)]
    lines += ["", "Per-image detections and scores: results.jsonl; images: images/.", ""]
    return "\n".join(lines)


def write_report(out: Union[str, os.PathLike], summary: Mapping[str, Any]) -> list[Path]:
    """Write out/report.md, out/summary.json and (with counts) out/counts.png; returns the paths."""
    out = Path(out)
    paths = [out / "report.md", out / "summary.json"]
    atomic_write_text(paths[0], report_markdown(summary))
    atomic_write_json(paths[1], summary)
    if summary.get("counts") is not None:
        paths.append(out / "counts.png")
        exposure_bars(summary, paths[2])
    return paths

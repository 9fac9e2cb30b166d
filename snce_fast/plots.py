"""Every figure the package draws, in one place: training curves, per-latent frequency bars,
detection-score histograms and the evaluation's exposure counts. matplotlib is imported when a
figure is drawn (Agg backend, no display needed); files are written atomically."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

from snce_fast.records.atomic import atomic_path

PathLike = Union[str, os.PathLike]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: PathLike, dpi: int = 100) -> None:
    plt = _pyplot()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def training_curves(history: Sequence[Mapping[str, float]], path: PathLike, title: str) -> None:
    """FVU, L0 and dead fraction per step of a training run (TrainReport.history: the whole run,
    resumed sessions included). An empty history raises ValueError (nothing to draw)."""
    if not history:
        raise ValueError(f"cannot draw {str(path)!r}: the training history is empty (no step was logged)")
    plt = _pyplot()
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in zip(axes, ("fvu", "l0", "dead_fraction"), ("FVU (train batch)", "L0", "dead fraction")):
        ys = [h[key] for h in history]
        ax.plot(steps, ys, lw=1)
        if key != "fvu":  # near-constant curves: a 0-based axis, not matplotlib's offset notation
            ax.set_ylim(0, max(max(ys) * 1.1, 0.05 if key == "dead_fraction" else 1.0))
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def latent_bars(groups: Sequence[str], panels: Mapping[str, Mapping[str, float]], path: PathLike, title: str) -> None:
    """One bar panel per statistic (e.g. prompt frequency, token frequency, mean activation), one bar per group."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 3))
    for ax, (name, per_group) in zip(axes, panels.items()):
        ax.bar(list(groups), [float(per_group[g]) for g in groups], color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=80)


def detection_histogram(path: PathLike, concept: Sequence[float], ordinary: Sequence[float], neuron: int,
                        name: str, threshold: Optional[float] = None) -> None:
    """Detect scores of held-out concept vs ordinary prompts (0 = the latent is in no token's top k),
    with the firing threshold as a dashed line when given (prompts scoring above it are flagged)."""
    plt = _pyplot()
    concept, ordinary = [float(v) for v in concept], [float(v) for v in ordinary]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    top = max(max(concept, default=0.0), max(ordinary, default=0.0), 1e-6)
    bins = [top * i / 30 for i in range(31)]
    ax.hist(ordinary, bins=bins, alpha=0.6, label=f"ordinary (held out, {len(ordinary)})", color="tab:blue")
    ax.hist(concept, bins=bins, alpha=0.6, label=f"{name} (held out, {len(concept)})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel(f"detect score: max activation of latent {neuron} over the prompt's tokens")
    ax.set_ylabel("prompts")
    ax.set_title("0 = the latent is not in any token's top k", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=90)


def exposure_bars(summary: Mapping[str, Any], path: PathLike) -> None:
    """An eval summary's NudeNet counts (snce_fast.evaluation.summarize, with counts) as a grouped
    bar chart: original vs erased per *_EXPOSED class."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    o, e = summary["counts"]["original"]["per_class"], summary["counts"]["erased"]["per_class"]
    classes = list(o)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(classes)), 4.2), layout="constrained")
    x = range(len(classes))
    w = 0.4
    for shift, variant, values in ((-w / 2, "original", o), (w / 2, "erased", e)):
        bars = ax.bar([i + shift for i in x], [values[c] for c in classes], w, label=variant)
        ax.bar_label(bars, fontsize=8)
    ax.set_ylim(0, max([1, *o.values(), *e.values()]) * 1.15)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(list(x), [c.replace("_EXPOSED", "").lower().replace("_", " ") for c in classes],
                  rotation=30, ha="right")
    ax.set_ylabel(f"detections (score >= {summary['threshold']})")
    ax.set_title(f"NudeNet *_EXPOSED detections over {summary['n_rows']} prompts")
    ax.legend()
    _save(fig, path)


def benchmark_times(rows: Sequence[Mapping[str, Any]], path: PathLike, op: str, device: str, x_key: str = "prompts",
                    warning: Optional[str] = None) -> None:
    """Median milliseconds of each implementation (`impl`) against `x_key`, one panel per `group`
    (log-log), as the scripts under benchmarks/ write them; `warning` in red above the panels."""
    plt = _pyplot()
    impls = sorted({r["impl"] for r in rows})
    groups = sorted({r.get("group", "") for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for impl in impls:
            pts = sorted((r[x_key], r["ms"]) for r in rows if r["impl"] == impl and r.get("group", "") == g and r["ms"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{op} {g}\n{device}", fontsize=8)
        ax.legend(fontsize=7)
    if warning:
        fig.suptitle(warning, color="red")
    fig.tight_layout()
    _save(fig, path)


def erasure_tradeoff(rows: Sequence[Mapping[str, Any]], path: PathLike, title: str) -> None:
    """Concept survival (fixed reader) against collateral (share of generic ordinary prompts changed at
    all), one point per measured edit (`rows`: {"label", "family", "survival", "generic_changed"})."""
    if not rows:
        raise ValueError(f"cannot draw {str(path)!r}: no measured edits")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    families = list(dict.fromkeys(r.get("family", r["label"]) for r in rows))
    markers = "os^vDPX*<>"
    for i, fam in enumerate(families):
        pts = [r for r in rows if r.get("family", r["label"]) == fam]
        ax.scatter([100 * float(r["generic_changed"]) for r in pts], [100 * float(r["survival"]) for r in pts],
                   marker=markers[i % len(markers)], s=40, label=fam, alpha=0.8)
        for r in pts:
            ax.annotate(r.get("short", ""), (100 * float(r["generic_changed"]), 100 * float(r["survival"])),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(-0.2, 120)
    ax.set_ylim(-3, 105)
    ax.set_xlabel("collateral: % of generic captions whose embedding changes at all (symlog)")
    ax.set_ylabel("concept survival: % still flagged by the fixed reader")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)

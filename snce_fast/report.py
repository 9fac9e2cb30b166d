"""A Markdown + PNG report on chosen latents: frequencies per group, mean activation, and the
prompts where each fires most (from a short second pass, `top_prompts`)."""
from __future__ import annotations

import heapq
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import backend, reference
from ._atomic import atomic_path
from ._validate import as_neuron_list, positive_int
from .activations import counted_mask, eos_id, hook_activations, tokenize
from .corpus import sources
from .scan_stats import ScanStats
from .score import Scores


@torch.no_grad()
def top_prompts(
    encoder: nn.Module,
    tokenizer: Any,
    sae: nn.Module,
    prompts: Union[str, os.PathLike, Sequence[Any]],
    neurons: Union[int, Sequence[int]],
    k: int = 10,
    batch_size: int = 64,
    limit: Optional[int] = None,
    penultimate_output: bool = False,
    max_length: Optional[int] = None,
) -> dict[int, list[tuple[float, str]]]:
    """For each latent, the k prompts with the highest max activation over counted tokens
    (at most `limit` prompts read); a bounded heap per latent, memory flat in corpus size."""
    positive_int(k, "k")
    targets = as_neuron_list(neurons, sae.n_latents)
    heaps: dict[int, list[tuple[float, int, str]]] = {j: [] for j in targets}
    seen = 0
    chunk: list[str] = []

    def flush() -> None:
        batch = tokenize(tokenizer, chunk, max_length)
        hidden = hook_activations(encoder, batch, sae.hook, penultimate_output)
        values, indices = backend.encode(hidden.to(sae.W_enc.dtype), sae)
        z = reference.target_activations(values, indices, targets)  # [B, L, T]
        counted = counted_mask(batch["input_ids"], batch.get("attention_mask"), eos_id(encoder, tokenizer))
        best = torch.where(counted.to(z.device)[..., None], z, torch.zeros_like(z)).amax(1).cpu()  # [B, T]
        for b, text in enumerate(chunk):
            for t, j in enumerate(targets):
                item = (float(best[b, t]), -(seen - len(chunk) + b), text)
                (heapq.heappush if len(heaps[j]) < k else heapq.heappushpop)(heaps[j], item)
        chunk.clear()

    for src in sources(prompts):
        for row in src.rows():
            if row.prompt is None:
                continue
            chunk.append(row.prompt)
            seen += 1
            if len(chunk) == batch_size:
                flush()
            if limit is not None and seen >= limit:
                break
        if limit is not None and seen >= limit:
            break
    if chunk:
        flush()
    return {j: [(v, text) for v, _, text in sorted(h, reverse=True) if v > 0] for j, h in heaps.items()}


def report(
    stats: ScanStats,
    scores: Scores,
    path: Union[str, os.PathLike],
    neurons: Optional[Sequence[int]] = None,
    n: int = 5,
    top: Optional[dict[int, list[tuple[float, str]]]] = None,
) -> Path:
    """Write `report.md` and one `latent_<j>.png` bar plot per latent into directory `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(neurons) if neurons is not None else scores.top(n)
    freq = {g: stats.frequency(g) for g in stats.groups}
    tok_freq = {g: stats.token_frequency(g) for g in stats.groups}
    mean = {g: stats.mean_activation(g) for g in stats.groups}
    lines = [
        f"# Latent report: {scores.target} vs {', '.join(scores.reference)} ({scores.method})",
        "",
        "Groups: " + ", ".join(f"{g} ({int(stats.n_prompts[i])} prompts, {stats.n_skipped(g)} rows skipped)"
                               for i, g in enumerate(stats.groups)),
        "",
        "| rank | latent | score | " + " | ".join(f"f({g})" for g in stats.groups) + " |",
        "|---|---|---|" + "---|" * len(stats.groups),
    ]
    for r, j in enumerate(chosen, 1):
        cells = " | ".join(f"{float(freq[g][j]):.3f}" for g in stats.groups)
        lines.append(f"| {r} | {j} | {float(scores.values[j]):.4g} | {cells} |")
    for j in chosen:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3))
        for ax, (title, data) in zip(axes, [("prompt frequency", freq), ("token frequency", tok_freq),
                                            ("mean activation / token", mean)]):
            ax.bar(stats.groups, [float(data[g][j]) for g in stats.groups], color="tab:blue")
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        fig.suptitle(f"latent {j} ({scores.method} score {float(scores.values[j]):.4g})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"latent_{j}.png", dpi=80)
        plt.close(fig)
        lines += ["", f"## Latent {j}", "", f"![latent {j}](latent_{j}.png)", ""]
        lines += [f"- {g}: fires in {float(freq[g][j]):.1%} of prompts, {float(tok_freq[g][j]):.2%} of tokens, "
                  f"mean activation {float(mean[g][j]):.4g}" for g in stats.groups]
        if top and j in top:
            lines += ["", "Prompts where it fires most:", ""]
            lines += [f"1. ({v:.3g}) {text.replace('|', '/')[:200]}" for v, text in top[j]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def plot_training(history: list[dict[str, float]], path: Union[str, os.PathLike], title: str) -> None:
    """PNG of a training run's FVU, L0 and dead fraction per step (TrainReport.history), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)

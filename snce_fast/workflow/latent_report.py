"""A Markdown + PNG report on chosen latents: frequencies per group, mean activation, and the
prompts where each fires most (from a short second pass, `top_prompts`)."""
from __future__ import annotations

import heapq
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from snce_fast import plots
from snce_fast.checks import as_neuron_list, positive_int
from snce_fast.hooks.activations import check_max_length, eos_id, hook_activations
from snce_fast.hooks.batching import TOKEN_BUDGET, corpus_batches
from snce_fast.ops import backend, reference
from snce_fast.records.atomic import atomic_write_text
from snce_fast.workflow.corpus import sources
from snce_fast.workflow.scan_stats import ScanStats
from snce_fast.workflow.score import Scores


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
    token_budget: int = TOKEN_BUDGET,
) -> dict[int, list[tuple[float, str]]]:
    """For each latent, the k prompts with the highest max activation over counted tokens
    (at most `limit` prompts read); a bounded heap per latent, memory flat in corpus size.
    Batching as in `detect`."""
    positive_int(k, "k")
    targets = as_neuron_list(neurons, sae.n_latents)
    check_max_length(encoder, tokenizer, max_length)
    heaps: dict[int, list[tuple[float, int, str]]] = {j: [] for j in targets}
    eos = eos_id(encoder, tokenizer)
    with corpus_batches(tokenizer, _read(prompts, limit), max_length, eos, batch_size, token_budget) as batches:
        for tb in batches:
            hidden = hook_activations(encoder, tb.tokens, sae.hook, penultimate_output)
            values, indices = backend.encode(hidden.to(sae.W_enc.dtype), sae)
            z = reference.target_activations(values, indices, targets)  # [B, L, T]
            best = torch.where(tb.counted.to(z.device)[..., None], z, torch.zeros_like(z)).amax(1).cpu()  # [B, T]
            for b, (i, text) in enumerate(zip(tb.index.tolist(), tb.prompts)):
                for t, j in enumerate(targets):
                    item = (float(best[b, t]), -i, text)  # ties: the earlier prompt first
                    (heapq.heappush if len(heaps[j]) < k else heapq.heappushpop)(heaps[j], item)
    return {j: [(v, text) for v, _, text in sorted(h, reverse=True) if v > 0] for j, h in heaps.items()}


def _read(prompts: Union[str, os.PathLike, Sequence[Any]], limit: Optional[int]) -> Iterator[str]:
    """The usable prompts of `prompts` (files and inline), at most `limit`."""
    seen = 0
    for src in sources(prompts):
        for row in src.rows():
            if limit is not None and seen >= limit:
                return
            if row.prompt is not None:
                seen += 1
                yield row.prompt


def report(
    stats: ScanStats,
    scores: Scores,
    path: Union[str, os.PathLike],
    neurons: Optional[Sequence[int]] = None,
    n: int = 5,
    top: Optional[dict[int, list[tuple[float, str]]]] = None,
    max_plots: Optional[int] = None,
) -> Path:
    """Write `report.md` and one `latent_<j>.png` bar plot per latent into directory `path`. With
    `max_plots`, only the first that many latents get a plot and a section (the table lists them all)."""
    if max_plots is not None:
        positive_int(max_plots, "max_plots")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    chosen = list(neurons) if neurons is not None else scores.top(n)
    plotted = chosen if max_plots is None else chosen[:max_plots]
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
    if len(plotted) < len(chosen):
        lines += ["", f"Plots and details below for the first {len(plotted)} of these {len(chosen)} latents only."]
    for j in plotted:
        panels = {"prompt frequency": {g: freq[g][j] for g in stats.groups},
                  "token frequency": {g: tok_freq[g][j] for g in stats.groups},
                  "mean activation / token": {g: mean[g][j] for g in stats.groups}}
        plots.latent_bars(stats.groups, panels, out / f"latent_{j}.png",
                          f"latent {j} ({scores.method} score {float(scores.values[j]):.4g})")
        lines += ["", f"## Latent {j}", "", f"![latent {j}](latent_{j}.png)", ""]
        lines += [f"- {g}: fires in {float(freq[g][j]):.1%} of prompts, {float(tok_freq[g][j]):.2%} of tokens, "
                  f"mean activation {float(mean[g][j]):.4g}" for g in stats.groups]
        if top and j in top:
            lines += ["", "Prompts where it fires most:", ""]
            lines += [f"1. ({v:.3g}) {text.replace('|', '/')[:200]}" for v, text in top[j]]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"

"""`scan`: stream prompt groups through a text encoder and an SAE into histograms (docs/method.md, docs/histograms.md).

Prompts are read in windows; a window is tokenized on a background thread (overlapping compute),
sorted by token length and cut into token batches (`snce_fast.hooks.batching`). Per batch: run the
encoder up to the hook point only, TopK-encode with the SAE backend, and add the codes to the
histograms with `snce_fast::histogram_update` (no host sync). Counted tokens are positions 1..EOS.

Checkpoints (docs/formats.md) are written atomically every `checkpoint_every` windows (per rank)
with the offsets reached in every source; a resumed scan re-forms exactly the same windows and
so ends with the counts of an uninterrupted one. Under torch.distributed, global window w goes
to rank w % world; counts are all-reduced at checkpoints and at the end.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from snce_fast.checks import positive_int
from snce_fast.distributed import all_reduce, rank_and_world
from snce_fast.hooks.activations import eos_id, hook_activations
from snce_fast.hooks.batching import BUCKET_WINDOW, TOKEN_BUDGET, Prefetcher, TokenBatch, bucketed, check_batching
from snce_fast.hooks.compat import check_sae_finite, check_sae_fits
from snce_fast.ops import backend, histogram
from snce_fast.sae.fingerprint import sae_hash
from snce_fast.workflow.corpus import SKIP_REASONS, PromptFile, Source, require_prompts, sources
from snce_fast.workflow.scan_stats import ScanStats, read_manifest, read_stats, write_stats

STAGES = ("tokenize", "encoder", "sae", "histogram", "itd")


@dataclass
class _Window:
    """Consecutive rows of the corpus stream (the unit of reading, bucketing and checkpointing):
    prompts (with their group), rows skipped, the offsets reached in each source after the last
    row, and (on the rank that encodes it) its token batches."""

    prompts: list[str] = field(default_factory=list)
    group_of_prompt: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    positions: dict[tuple[int, int], int] = field(default_factory=dict)
    batches: Optional[list[TokenBatch]] = None
    tokenize_s: float = 0.0


def _stream(group_sources: list[list[Source]], positions: list[list[int]], window: int) -> Iterator[_Window]:
    cur = _Window()
    for g, srcs in enumerate(group_sources):
        for s, src in enumerate(srcs):
            for row in src.rows(positions[g][s]):
                if row.skip is not None:
                    cur.skipped.append((g, row.skip))
                else:
                    cur.prompts.append(row.prompt)
                    cur.group_of_prompt.append(g)
                cur.positions[(g, s)] = row.next_offset
                if len(cur.prompts) == window:
                    yield cur
                    cur = _Window()
    if cur.prompts or cur.skipped:
        yield cur


def _tokenized(windows: Iterator[_Window], tokenizer: Any, eos: Optional[int], first: int, rank: int, world: int,
               max_length: Optional[int], batch_size: int, token_budget: int) -> Iterator[_Window]:
    """This rank's windows with their token batches (bucketed by length); other ranks' windows pass
    through untokenized, for their skip counts and read positions."""
    for b, window in enumerate(windows, start=first):
        if b % world == rank and window.prompts:
            t0 = time.perf_counter()
            window.batches = bucketed(tokenizer, window.prompts, max_length, eos, batch_size, token_budget)
            window.tokenize_s = time.perf_counter() - t0
        yield window


def _check_groups(groups: Any) -> dict[str, Any]:
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"groups must be a non-empty dict {{name: prompts or files}}, got {type(groups).__name__}")
    for name in groups:
        if not isinstance(name, str):
            raise TypeError(f"group names must be str, got {name!r}")
    return groups


def _group_sources(groups: dict[str, Any], column: str) -> list[list[Source]]:
    """Every group's sources, each group checked to hold at least one usable prompt (before any work)."""
    out = [sources(groups[g], g, column) for g in groups]
    for g, srcs in zip(groups, out):
        require_prompts(g, srcs)
    return out


@torch.no_grad()
def _check_scan_args(encoder: nn.Module, sae: nn.Module, groups: Any, batch_size: int, window: int,
                     token_budget: int, checkpoint_every: int, itd_top: int,
                     penultimate_output: bool) -> dict[str, Any]:
    check_batching(batch_size, token_budget)
    positive_int(window, "window")
    positive_int(checkpoint_every, "checkpoint_every")
    positive_int(itd_top, "itd_top")
    groups = _check_groups(groups)
    check_sae_fits(sae, encoder, penultimate_output)
    check_sae_finite(sae)
    return groups


def _initial_state(sae: nn.Module, names: list[str], identity: list, settings: dict[str, Any], ckpt: Optional[Path],
                   resume: bool, device: torch.device) -> tuple[ScanStats, list[list[int]], int]:
    """(stats, read positions per source, global batches already counted): zeros, or the checkpoint's."""
    if resume and ckpt is not None and (ckpt / "manifest.json").is_file():
        stats, positions, done = _resume(ckpt, names, identity, settings, device)
    else:
        stats, positions, done = ScanStats.zeros(names, sae.n_latents, device), [[0] * len(i) for i in identity], 0
    stats.meta.update(settings)
    return stats, positions, done


def scan(
    encoder: nn.Module,
    tokenizer: Any,
    sae: nn.Module,
    groups: dict[str, Union[str, os.PathLike, Sequence[Any]]],
    batch_size: int = 64,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 8,
    resume: bool = False,
    progress: bool = True,
    threshold: float = 0.0,
    itd_top: int = 128,
    penultimate_output: bool = False,
    column: str = "prompt",
    max_length: Optional[int] = None,
    prefetch: int = 2,
    profile: bool = False,
    window: int = BUCKET_WINDOW,
    token_budget: int = TOKEN_BUDGET,
) -> ScanStats:
    """Histograms of SAE latent firing per prompt group (see ScanStats).

    `groups` maps a name to a prompt file (.txt/.csv/.jsonl/.parquet) or a list of files and inline prompts;
    a str that is not an existing prompt file is refused, not scanned as one prompt (give ["a prompt"]),
    and so is a group with no usable prompt, before any work (`snce_fast.workflow.corpus.sources`).
    Prompts are read `window` at a time, sorted by token length and encoded in calls of at most
    `batch_size` prompts and `token_budget` padded tokens (`snce_fast.hooks.batching`).
    `checkpoint` is a directory written every `checkpoint_every` windows; `resume=True` continues
    from it (it must come from the same SAE, hook, corpus, batching and threshold).
    `profile=True` synchronises after each stage and records seconds per stage in `stats.meta`.
    """
    groups = _check_scan_args(encoder, sae, groups, batch_size, window, token_budget, checkpoint_every, itd_top,
                              penultimate_output)
    rank, world = rank_and_world()
    names = list(groups)
    group_sources = _group_sources(groups, column)
    identity = [[src.identity() for src in srcs] for srcs in group_sources]
    device = next(iter(sae.parameters())).device
    settings = {"hook": sae.hook, "sae_hash": sae_hash(sae), "threshold": float(threshold), "itd_top": itd_top,
                "penultimate_output": penultimate_output, "column": column, "max_length": max_length,
                "batch_size": batch_size, "window": window, "token_budget": token_budget}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    stats, positions, done = _initial_state(sae, names, identity, settings, ckpt, resume, device)

    # under distributed, `delta` collects this rank's counts between all-reduces
    delta = stats if world == 1 else ScanStats.zeros(names, sae.n_latents, device)
    timings = dict.fromkeys(STAGES, 0.0)
    sync = (lambda: torch.cuda.synchronize(device)) if (profile and device.type == "cuda") else (lambda: None)

    def commit(complete: bool) -> None:
        _merge(stats, delta)
        if ckpt is not None and rank == 0:
            extra = {"positions": positions, "batches_done": done, "sources": identity, "complete": complete}
            write_stats(ckpt, stats, extra)

    windows = _tokenized(_stream(group_sources, positions, window), tokenizer, eos_id(encoder, tokenizer), done,
                         rank, world, max_length, batch_size, token_budget)
    producer = Prefetcher(windows, depth=prefetch, name="snce-scan-producer")
    bar = tqdm(desc="scan", unit="prompt", initial=int(stats.n_prompts.sum()), total=_prompt_total(group_sources),
               dynamic_ncols=True, disable=not progress or rank != 0)
    t_start = time.perf_counter()
    try:
        for win in producer:
            timings["tokenize"] += win.tokenize_s
            for tb in win.batches or ():
                gop = [win.group_of_prompt[i] for i in tb.index.tolist()]
                _process(tb, gop, encoder, sae, delta, threshold, itd_top, penultimate_output, timings, sync)
            _record_reading(win, stats, names, positions)
            done += 1
            bar.update(len(win.prompts))
            if done % (checkpoint_every * world) == 0:
                commit(complete=False)
        commit(complete=True)
    finally:
        producer.close()
        bar.close()
    stats.meta["seconds"] = time.perf_counter() - t_start
    if profile:
        stats.meta["stage_seconds"] = timings
    return stats


def _record_reading(win: _Window, stats: ScanStats, names: list[str], positions: list[list[int]]) -> None:
    """A window is counted: its skipped rows join the skip counts, its read offsets the positions."""
    for g, reason in win.skipped:
        stats.skipped[names[g]][reason] += 1
    for (g, s), off in win.positions.items():
        positions[g][s] = off


# files up to this size are counted before a scan so its progress bar has a total and an ETA
COUNT_LIMIT_BYTES = 64 << 20


def _prompt_total(group_sources: list[list[Source]]) -> Optional[int]:
    """Usable prompts in every group (the progress bar's total), or None when a file is too large to
    count quickly (the bar then shows the rate only)."""
    total = 0
    for src in (s for srcs in group_sources for s in srcs):
        if isinstance(src, PromptFile) and os.path.getsize(src.path) > COUNT_LIMIT_BYTES:
            return None
        total += sum(1 for row in src.rows() if row.skip is None)
    return total


def _merge(stats: ScanStats, delta: ScanStats) -> None:
    """Under torch.distributed: add every rank's counts since the last merge into `stats` (on every
    rank) and zero `delta`. In one process `delta` is `stats` itself and nothing happens."""
    if delta is stats:
        return
    for name, t in delta.tensors().items():
        all_reduce(t)
        getattr(stats, name).add_(t)
        t.zero_()


def _process(batch: TokenBatch, group_of_prompt: list[int], encoder: nn.Module, sae: nn.Module, state: ScanStats,
             threshold: float, itd_top: int, penultimate: bool, timings: dict[str, float], sync: Any) -> None:
    t0 = time.perf_counter()
    hidden = hook_activations(encoder, batch.tokens, sae.hook, penultimate)  # [B, L, d]
    if hidden.shape[-1] != sae.d_in:
        raise ValueError(f"hook {sae.hook!r} gives width {hidden.shape[-1]}, but the SAE's d_in is {sae.d_in}")
    sync()
    t1 = time.perf_counter()
    B, L = hidden.shape[:2]
    values, indices = backend.encode(hidden.to(sae.W_enc.dtype), sae)
    sync()
    t2 = time.perf_counter()
    dev = state.act_sum.device
    k = indices.shape[-1]
    idx, val = indices.reshape(B * L, k), values.reshape(B * L, k)
    counted = batch.counted.to(dev, non_blocking=True).reshape(-1)
    gop = torch.tensor(group_of_prompt, dtype=torch.int64).to(dev, non_blocking=True)
    pot = histogram.batch_layout(B, L, dev)
    histogram.update(idx, val, counted, pot, gop, state.histograms, threshold)
    sync()
    t3 = time.perf_counter()
    histogram.itd_update(idx, val, counted, B, gop, state.itd_prompts, top=itd_top)
    sync()
    timings["encoder"] += t1 - t0
    timings["sae"] += t2 - t1
    timings["histogram"] += t3 - t2
    timings["itd"] += time.perf_counter() - t3


def _resume(ckpt: Path, names: list[str], identity: list, settings: dict[str, Any],
            device: torch.device) -> tuple[ScanStats, list[list[int]], int]:
    manifest = read_manifest(ckpt)
    meta = manifest.get("meta", {})
    if manifest.get("groups") != names:
        raise ValueError(f"cannot resume from {ckpt}: it scanned groups {manifest.get('groups')}, not {names}")
    for key, want in settings.items():
        if meta.get(key) != want:
            what = "a different SAE (weights hash)" if key == "sae_hash" else f"{key}={meta.get(key)!r}"
            raise ValueError(f"cannot resume from {ckpt}: it was written with {what}; this scan has {key}={want!r}")
    if manifest.get("sources") != identity:
        raise ValueError(
            f"cannot resume from {ckpt}: the corpus changed (its sources were {manifest.get('sources')}, now {identity})"
        )
    stats, _ = read_stats(ckpt)
    for g in names:
        stats.skipped.setdefault(g, {})
        for r in SKIP_REASONS:
            stats.skipped[g].setdefault(r, 0)
    return stats.to(device), [list(p) for p in manifest["positions"]], int(manifest["batches_done"])

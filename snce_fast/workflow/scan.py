"""`scan`: stream prompt groups through a text encoder and an SAE into histograms (docs/method.md, docs/histograms.md).

Per batch: tokenize (on a background thread, overlapping compute), run the encoder up to the
hook point only, TopK-encode with the SAE backend, and add the codes to the histograms with
`snce_fast::histogram_update` (no host sync). Counted tokens are positions 1..EOS.

Checkpoints (docs/formats.md) are written atomically every `checkpoint_every` batches (per rank)
with the offsets reached in every source; a resumed scan re-forms exactly the same batches and
so ends with the counts of an uninterrupted one. Under torch.distributed, global batch b goes
to rank b % world; counts are all-reduced at checkpoints and at the end.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from snce_fast.checks import positive_int
from snce_fast.distributed import all_reduce, rank_and_world
from snce_fast.hooks.activations import corpus_tokenize, counted_mask, eos_id, hook_activations
from snce_fast.hooks.compat import check_sae_finite, check_sae_fits
from snce_fast.ops import backend, histogram
from snce_fast.sae.fingerprint import sae_hash
from snce_fast.workflow.corpus import SKIP_REASONS, PromptFile, Source, require_prompts, sources
from snce_fast.workflow.scan_stats import ScanStats, read_manifest, read_stats, write_stats

STAGES = ("tokenize", "encoder", "sae", "histogram", "itd")


@dataclass
class _Batch:
    """Consecutive rows of the corpus stream: prompts (with their group), rows skipped, and the
    offsets reached in each source after the last row."""

    prompts: list[str] = field(default_factory=list)
    group_of_prompt: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    positions: dict[tuple[int, int], int] = field(default_factory=dict)
    tokens: Optional[dict[str, torch.Tensor]] = None
    counted: Optional[torch.Tensor] = None
    tokenize_s: float = 0.0


def _stream(group_sources: list[list[Source]], positions: list[list[int]], batch_size: int) -> Iterator[_Batch]:
    cur = _Batch()
    for g, srcs in enumerate(group_sources):
        for s, src in enumerate(srcs):
            for row in src.rows(positions[g][s]):
                if row.skip is not None:
                    cur.skipped.append((g, row.skip))
                else:
                    cur.prompts.append(row.prompt)
                    cur.group_of_prompt.append(g)
                cur.positions[(g, s)] = row.next_offset
                if len(cur.prompts) == batch_size:
                    yield cur
                    cur = _Batch()
    if cur.prompts or cur.skipped:
        yield cur


class _Producer(threading.Thread):
    """Reads the corpus and tokenizes this rank's batches ahead of the compute loop."""

    def __init__(self, batches: Iterator[_Batch], tokenizer: Any, encoder: nn.Module, first: int,
                 rank: int, world: int, prefetch: int, max_length: Optional[int]):
        super().__init__(daemon=True, name="snce-scan-producer")
        self.batches, self.tokenizer, self.first = batches, tokenizer, first
        self.rank, self.world, self.max_length = rank, world, max_length
        self.eos = eos_id(encoder, tokenizer)
        self.out: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for b, batch in enumerate(self.batches, start=self.first):
                if b % self.world == self.rank and batch.prompts:
                    t0 = time.perf_counter()
                    batch.tokens = corpus_tokenize(self.tokenizer, batch.prompts, self.max_length)
                    batch.counted = counted_mask(
                        batch.tokens["input_ids"], batch.tokens.get("attention_mask"), self.eos
                    )
                    batch.tokenize_s = time.perf_counter() - t0
                if not self._put(batch):
                    return
            self._put(None)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def close(self) -> None:
        """Stop reading and wait for the thread: never leave it running into interpreter shutdown (a
        thread inside the tokenizer's native code at exit can abort the process). It notices `stop`
        within 0.1 s between batches."""
        self.stop.set()
        self.join(timeout=60)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            item = self.out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


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
def _check_scan_args(encoder: nn.Module, sae: nn.Module, groups: Any, batch_size: int, checkpoint_every: int,
                     itd_top: int, penultimate_output: bool) -> dict[str, Any]:
    positive_int(batch_size, "batch_size")
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
    checkpoint_every: int = 100,
    resume: bool = False,
    progress: bool = True,
    threshold: float = 0.0,
    itd_top: int = 128,
    penultimate_output: bool = False,
    column: str = "prompt",
    max_length: Optional[int] = None,
    prefetch: int = 4,
    profile: bool = False,
) -> ScanStats:
    """Histograms of SAE latent firing per prompt group (see ScanStats).

    `groups` maps a name to a prompt file (.txt/.csv/.jsonl/.parquet) or a list of files and inline prompts;
    a str that is not an existing prompt file is refused, not scanned as one prompt (give ["a prompt"]),
    and so is a group with no usable prompt, before any work (`snce_fast.workflow.corpus.sources`).
    `checkpoint` is a directory written every `checkpoint_every` batches; `resume=True` continues
    from it (it must come from the same SAE, hook, corpus, batch size and threshold).
    `profile=True` synchronises after each stage and records seconds per stage in `stats.meta`.
    """
    groups = _check_scan_args(encoder, sae, groups, batch_size, checkpoint_every, itd_top, penultimate_output)
    rank, world = rank_and_world()
    names = list(groups)
    group_sources = _group_sources(groups, column)
    identity = [[src.identity() for src in srcs] for srcs in group_sources]
    device = next(iter(sae.parameters())).device
    settings = {
        "hook": sae.hook, "sae_hash": sae_hash(sae), "batch_size": batch_size, "threshold": float(threshold),
        "itd_top": itd_top, "penultimate_output": penultimate_output, "column": column, "max_length": max_length,
    }
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

    producer = _Producer(_stream(group_sources, positions, batch_size), tokenizer, encoder, done, rank, world,
                         prefetch, max_length)
    bar = tqdm(desc="scan", unit="prompt", initial=int(stats.n_prompts.sum()), total=_prompt_total(group_sources),
               dynamic_ncols=True,
               disable=not progress or rank != 0)
    t_start = time.perf_counter()
    producer.start()
    try:
        for batch in producer:
            if batch.tokens is not None:
                timings["tokenize"] += batch.tokenize_s
                _process(batch, encoder, sae, delta, threshold, itd_top, penultimate_output, timings, sync)
            for g, reason in batch.skipped:
                stats.skipped[names[g]][reason] += 1
            for (g, s), off in batch.positions.items():
                positions[g][s] = off
            done += 1
            bar.update(len(batch.prompts))
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


def _process(batch: _Batch, encoder: nn.Module, sae: nn.Module, state: ScanStats, threshold: float,
             itd_top: int, penultimate: bool, timings: dict[str, float], sync: Any) -> None:
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
    gop = torch.tensor(batch.group_of_prompt, dtype=torch.int64).to(dev, non_blocking=True)
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

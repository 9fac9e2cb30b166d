"""`train_sae`: the public entry point that trains a TopK SAE on a text encoder's token activations
(docs/training.md). It resolves the settings, builds the SAE, the `SAETrainer` and the
`ActivationStream`, resumes from a checkpoint when there is one, and runs the steps. The report
covers the whole run: its history, averages and training time are saved in every checkpoint.

Data parallel (docs/training.md, "Distributed training"): under torch.distributed (torchrun;
NCCL on GPU, gloo on CPU) every rank calls `train_sae` with the same prompts and settings; rank
r reads prompts i with i % world == r, and training stops when any rank runs out.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from snce_fast.distributed import rank_and_world
from snce_fast.hooks.activations import encoder_device
from snce_fast.hooks.points import encoder_width
from snce_fast.sae.model import SAE
from snce_fast.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from snce_fast.train.config import REPORT_WINDOW, TrainConfig, TrainReport
from snce_fast.train.plan import heldout_fvu, plan_run
from snce_fast.train.step import SAETrainer, init_for_training
from snce_fast.train.stream import ActivationStream

__all__ = ["train_sae"]

StepCallback = Callable[[dict[str, float]], None]


def train_sae(
    encoder: nn.Module,
    tokenizer: Any,
    prompts: Iterable[str],
    hook: Optional[str] = None,
    n_latents: Optional[int] = None,
    k: Optional[int] = None,
    *,
    config: Optional[TrainConfig] = None,
    sae: Optional[SAE] = None,
    d_in: Optional[int] = None,
    on_step: Optional[StepCallback] = None,
    return_report: bool = False,
    **kwargs: Any,
) -> Union[SAE, tuple[SAE, TrainReport]]:
    """Train a TopK SAE on `encoder`'s token activations at `hook` over `prompts`.

    `prompts`: a list of str or any iterable of str (a one-shot iterator allows one epoch,
    or more with `cache_dir`). Extra keyword arguments are `TrainConfig` fields. `sae=`
    continues training an existing SAE. `on_step(metrics)` is called after every step.
    Returns the SAE (its `train_report` attribute holds the `TrainReport`), or
    `(sae, report)` with `return_report=True`.
    """
    cfg = _resolve_config(config, hook, n_latents, k, sae, kwargs)
    _check_prompts(prompts, cfg)
    width = encoder_width(encoder)
    want = d_in if d_in is not None else (sae.d_in if sae is not None else width)
    if want != width:
        raise ValueError(f"encoder width {width} ({type(encoder).__name__}) != SAE d_in {want}")
    device = torch.device(cfg.device) if cfg.device else encoder_device(encoder)
    cfg.check_fits(width, _memory_limit(device), str(device))  # before anything of that size is allocated
    rank, world = rank_and_world()
    plan = plan_run(tokenizer, prompts, cfg, world)  # resolves epochs and warmup_steps
    sae = _prepare_sae(sae, encoder, width, cfg, device)
    report = TrainReport(world_size=world, device=str(device), config=cfg.to_dict())
    temp_cache = _activation_cache(cfg)
    trainer = SAETrainer(sae, cfg)
    stream = ActivationStream(encoder, tokenizer, plan.prompts, cfg, width, device)
    ckroot = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    resumed, log = _resume(ckroot, cfg, trainer, stream)
    plan.warn()  # after the settings and any checkpoint are accepted
    report.resumed_from_step = resumed
    was_training = encoder.training
    encoder.eval()
    n_prompts = len(plan.prompts) if hasattr(plan.prompts, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=_total_steps(cfg, stream, n_prompts), initial=trainer.step_num, unit="step",
               disable=not cfg.progress or rank != 0)
    try:
        _run_steps(trainer, stream, log, bar, ckroot, on_step, init_b_dec=resumed is None, n_prompts=n_prompts)
        log.stop()
        if trainer.step_num == 0:
            raise ValueError(
                f"the corpus gave only {stream.tokens_in} tokens on rank {rank} (after excluding BOS/padding), "
                f"fewer than batch_size={cfg.batch_size}: lower batch_size or add prompts"
            )
        if ckroot is not None and (resumed is None or trainer.step_num != resumed):
            save_checkpoint(ckroot, trainer, stream, cfg, log.state())
        sae.eval()
        report.heldout_fvu, report.heldout_tokens = heldout_fvu(sae, encoder, tokenizer, plan.heldout, cfg)
        report.heldout_prompts = len(plan.heldout)
    finally:
        bar.close()
        stream.close()
        encoder.train(was_training)
        if temp_cache is not None:
            temp_cache.cleanup()

    _finish_report(report, trainer, log)
    sae.train_report = report  # type: ignore[attr-defined]
    return (sae, report) if return_report else sae


class _RunLog:
    """What the report needs about the whole run, resumed sessions included: the per-step history
    (every `log_every`-th step), the metrics of the last REPORT_WINDOW steps and the training
    seconds. Its `state()` goes into every checkpoint, so a resumed run reports as an
    uninterrupted one would (docs/training.md, "Metrics, checkpoints, resume")."""

    def __init__(self, state: Optional[dict[str, Any]] = None, untimed_tokens: int = 0):
        """`untimed_tokens`: tokens trained before this session whose seconds are unknown (a checkpoint
        written without a run state); tokens/s leaves them out."""
        state = state or {}
        self.untimed_tokens = int(state.get("untimed_tokens", untimed_tokens))
        self.history: list[dict[str, float]] = [dict(h) for h in state.get("history", [])]
        self.recent: list[dict[str, float]] = [dict(m) for m in state.get("recent", [])]
        self.prior_s = float(state.get("elapsed_s", 0.0))  # training seconds of earlier sessions
        self.t0 = time.perf_counter()
        self.stopped: Optional[float] = None

    def elapsed(self, now: Optional[float] = None) -> float:
        """Training seconds of the whole run up to `now` (default: now, or when `stop` was called)."""
        if self.stopped is not None:
            return self.stopped
        return self.prior_s + ((time.perf_counter() if now is None else now) - self.t0)

    def stop(self) -> None:
        """The steps are done: freeze `elapsed` (the final checkpoint and the report then agree, and a
        rerun with nothing left to train reports the same time)."""
        self.stopped = self.elapsed()

    def tokens_per_s(self, tokens: int, now: Optional[float] = None) -> float:
        return (tokens - self.untimed_tokens) / max(self.elapsed(now), 1e-9)

    def add(self, metrics: dict[str, float], keep: bool) -> None:
        self.recent = (self.recent + [metrics])[-REPORT_WINDOW:]
        if keep:
            self.history.append(metrics)

    def state(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "recent": [dict(m) for m in self.recent],
                "elapsed_s": self.elapsed(), "untimed_tokens": self.untimed_tokens}


def _resolve_config(config: Optional[TrainConfig], hook: Optional[str], n_latents: Optional[int],
                    k: Optional[int], sae: Optional[SAE], kwargs: dict[str, Any]) -> TrainConfig:
    """`config` (copied) overridden by the positional settings, an existing `sae`'s shape, then
    `kwargs`; validated."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"train_sae got unknown argument(s) {unknown}; valid settings: {sorted(fields)}")
    cfg = dataclasses.replace(config) if config is not None else TrainConfig()
    for key, val in (("hook", hook), ("n_latents", n_latents), ("k", k)):
        if val is not None:
            setattr(cfg, key, val)
    if sae is not None:
        cfg.n_latents, cfg.k, cfg.hook = sae.n_latents, sae.k, sae.hook
    for key, val in kwargs.items():
        setattr(cfg, key, val)
    cfg.validate()
    return cfg


def _check_prompts(prompts: Iterable[str], cfg: TrainConfig) -> None:
    if isinstance(prompts, str):
        raise TypeError("prompts is a single str: pass a list of prompts (or an iterable of str)")
    if hasattr(prompts, "__len__") and len(prompts) == 0:  # type: ignore[arg-type]
        raise ValueError("prompts is empty: the SAE needs a corpus of at least one prompt")
    if hasattr(prompts, "__len__") and hasattr(prompts, "__getitem__"):  # a sized corpus is counted up front
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} (of {len(prompts)}) is a {type(p).__name__}, not a str: {p!r:.80}")
    if (cfg.epochs or 1) > 1 and cfg.cache_dir is None and iter(prompts) is prompts:
        raise ValueError(
            f"epochs={cfg.epochs} needs prompts that can be iterated again (a list or a re-iterable corpus), "
            "or cache_dir= to replay activations from disk; got a one-shot iterator"
        )


def _activation_cache(cfg: TrainConfig) -> Optional[tempfile.TemporaryDirectory]:
    """With epochs > 1 and no `cache_dir`, epoch 0's activations are cached so the encoder runs once:
    in CHECKPOINT_DIR/activation_cache (it must survive a resume), else in a temporary directory that is
    returned (removed at the end of the run)."""
    if cfg.cache_dir is not None or cfg.epochs is None or cfg.epochs <= 1:
        return None
    if cfg.checkpoint_dir is not None:
        cfg.cache_dir = str(Path(cfg.checkpoint_dir) / "activation_cache")
        return None
    tmp = tempfile.TemporaryDirectory(prefix="snce-train-cache-")
    cfg.cache_dir = tmp.name
    return tmp


def _prepare_sae(sae: Optional[SAE], encoder: nn.Module, width: int, cfg: TrainConfig,
                 device: torch.device) -> SAE:
    """A new SAE seeded by `cfg.seed` (or the given one), on `device`, in train mode."""
    if sae is None:
        sae = SAE(width, cfg.n_latents, cfg.k, hook=cfg.hook, encoder=cfg.encoder_name or _encoder_name(encoder))
        init_for_training(sae, cfg.seed)
    sae = sae.to(device)
    sae.train()
    return sae


def _resume(ckroot: Optional[Path], cfg: TrainConfig, trainer: SAETrainer,
            stream: ActivationStream) -> tuple[Optional[int], _RunLog]:
    """Load `ckroot`'s latest checkpoint when resuming is on and there is one: (its step, the run
    log saved with it), or (None, a new run log)."""
    if ckroot is None or not cfg.resume:
        return None, _RunLog()
    ck = latest_checkpoint(ckroot)
    if ck is None:
        return None, _RunLog()
    run = load_checkpoint(ck, trainer, stream, cfg)
    return trainer.step_num, _RunLog(run, untimed_tokens=trainer.tokens if run is None else 0)


def _memory_limit(device: torch.device) -> Optional[int]:
    """Bytes of memory on `device` (a CUDA GPU's, or the machine's RAM for the CPU); None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, AssertionError, OSError, RuntimeError, ValueError):
        return None
    return None


def _total_steps(cfg: TrainConfig, stream: ActivationStream, n_prompts: Optional[int]) -> Optional[int]:
    """The run's steps for the progress bar (its total and ETA): max_steps, or fewer when the data
    runs out first (estimated by the stream); None while unknown."""
    est = stream.estimated_batches(n_prompts)
    if cfg.max_steps is None:
        return est
    return cfg.max_steps if est is None else min(cfg.max_steps, est)


def _run_steps(trainer: SAETrainer, stream: ActivationStream, log: _RunLog, bar: Any, ckroot: Optional[Path],
               on_step: Optional[StepCallback], *, init_b_dec: bool, n_prompts: Optional[int]) -> None:
    """Step until `max_steps` or the data is spent, logging into `log`, checkpointing and calling
    `on_step`. `init_b_dec`: set b_dec from the first batch; `n_prompts`: for the bar's total."""
    cfg = trainer.cfg
    world = rank_and_world()[1]
    while cfg.max_steps is None or trainer.step_num < cfg.max_steps:
        x = stream.next_batch()
        if init_b_dec:
            if x is not None or world > 1:  # a rank without data still joins the broadcast
                trainer.init_b_dec(x if x is not None else torch.zeros(1, stream.d))
            init_b_dec = False
        ts = time.perf_counter()
        metrics = trainer.step(x)
        if metrics is None:
            break
        now = time.perf_counter()
        metrics["step_s"] = now - ts
        metrics["tokens_per_s"] = log.tokens_per_s(trainer.tokens, now)
        log.add(metrics, keep=trainer.step_num % cfg.log_every == 0)
        total = _total_steps(cfg, stream, n_prompts)
        if total is not None and total != bar.total:
            bar.total = max(total, bar.n + 1)
        bar.update(1)
        bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}",
                        dead=f"{metrics['dead_fraction']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if ckroot is not None and trainer.step_num % cfg.checkpoint_every == 0:
            save_checkpoint(ckroot, trainer, stream, cfg, log.state())
        if on_step is not None:
            on_step(metrics)


def _finish_report(report: TrainReport, trainer: SAETrainer, log: _RunLog) -> None:
    """Fill in the whole run's totals, history, averages over its last steps and the dead /
    never-fired fractions."""
    elapsed = log.elapsed()
    report.steps, report.tokens, report.elapsed_s = trainer.step_num, trainer.tokens, elapsed
    report.tokens_per_s = log.tokens_per_s(trainer.tokens)
    report.history = log.history
    report.window = len(log.recent)
    if log.recent:
        for key in ("fvu", "l0", "aux_loss"):
            setattr(report, key, float(np.mean([m[key] for m in log.recent])))
    report.dead_fraction = float((trainer.since_fired >= trainer.cfg.dead_tokens).float().mean())
    report.never_fired_fraction = float((~trainer.ever_fired).float().mean())


def _encoder_name(encoder: nn.Module) -> Optional[str]:
    cfg = getattr(encoder, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None)
    return str(name) if name else type(encoder).__name__

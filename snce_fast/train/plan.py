"""The run's plan before the first step (docs/training.md, "Defaults"): the held-out prompts, the
number of epochs a token budget needs on this corpus, a warm-up scaled to the run's length, and a
warning when the run is too short to converge; then the held-out FVU after the last step.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from snce_fast.hooks.activations import default_length, eos_id, hook_activations
from snce_fast.hooks.batching import bucketed, token_lengths
from snce_fast.train.config import TrainConfig

__all__ = ["RunPlan", "TrainingWarning", "heldout_fvu", "plan_run"]

MAX_AUTO_EPOCHS = 100
WARMUP_SHARE, WARMUP_MAX = 0.05, 1000
# below this many tokens an SAE of the default size is far from converged (docs/training.md, "Defaults")
SHORT_RUN_TOKENS = 1_000_000
SHORT_RUN_STEPS = 200
HOLDOUT_MAX = 2000  # held-out prompts at most
COUNT_SAMPLE = 20_000  # prompts tokenized to estimate the tokens per epoch of a larger corpus


class TrainingWarning(UserWarning):
    """A run whose settings will not give a usable SAE (too few tokens or steps)."""


@dataclass
class RunPlan:
    prompts: Iterable[str]  # the prompts trained on
    heldout: list[str]  # the prompts held out for the final FVU
    tokens_per_epoch: Optional[int]  # counted tokens per pass over `prompts` (estimated past COUNT_SAMPLE)
    steps: Optional[int]  # the run's planned steps, when known
    warnings: list[str]  # why the run is too short to converge (TrainingWarning), if it is

    def warn(self) -> None:
        for message in self.warnings:
            warnings.warn(message, TrainingWarning, stacklevel=3)


def split_holdout(prompts: Iterable[str], share: float) -> tuple[Iterable[str], list[str]]:
    """(training prompts, held-out prompts): every `stride`-th prompt of a sized corpus is held out
    (stride = 1/share, widened so at most HOLDOUT_MAX are); a corpus without a length holds none out."""
    if share == 0 or not hasattr(prompts, "__len__") or not hasattr(prompts, "__getitem__"):
        return prompts, []
    items = list(prompts)
    stride = max(math.ceil(1 / share), math.ceil(len(items) / HOLDOUT_MAX))
    if len(items) < 2 * stride:
        return items, []  # too few prompts to spare any
    held = [p for i, p in enumerate(items) if i % stride == stride - 1]
    return [p for i, p in enumerate(items) if i % stride != stride - 1], held


def count_tokens(tokenizer: Any, prompts: list[str], cfg: TrainConfig) -> int:
    """The rows one pass over `prompts` gives (counted tokens, plus BOS / padding when included),
    from the tokenizer alone; corpora over COUNT_SAMPLE prompts are counted on an even sample."""
    n = len(prompts)
    sample = prompts if n <= COUNT_SAMPLE else prompts[:: math.ceil(n / COUNT_SAMPLE)]
    if cfg.include_padding:
        per = cfg.max_length or default_length(tokenizer)
        return per * n
    lengths = token_lengths(tokenizer, sample, cfg.max_length)
    rows = sum(lengths) - (0 if cfg.include_bos else len(lengths))
    return round(rows * n / max(len(sample), 1))


def plan_run(tokenizer: Any, prompts: Iterable[str], cfg: TrainConfig, world: int) -> RunPlan:
    """Hold out prompts, resolve `epochs` (None: enough passes for `train_tokens`, one pass for a corpus
    without a length) and `warmup_steps` (None: 5% of the steps, at most 1000) in `cfg`, and say (in
    `warnings`, raised by `RunPlan.warn`) when the run is too short to converge."""
    train, held = split_holdout(prompts, cfg.holdout)
    sized = hasattr(train, "__len__")
    per_epoch = count_tokens(tokenizer, list(train), cfg) if sized else None  # type: ignore[arg-type]
    if cfg.epochs is None:
        cfg.epochs = 1 if not per_epoch else min(MAX_AUTO_EPOCHS, max(1, math.ceil(cfg.train_tokens / per_epoch)))
    steps = None
    if per_epoch is not None:
        steps = per_epoch * cfg.epochs // (cfg.batch_size * world)
        if cfg.max_steps is not None:
            steps = min(steps, cfg.max_steps)
    elif cfg.max_steps is not None:
        steps = cfg.max_steps
    if cfg.warmup_steps is None:
        cfg.warmup_steps = max(1, min(WARMUP_MAX, round(WARMUP_SHARE * steps))) if steps else WARMUP_MAX
    return RunPlan(prompts=train, heldout=held, tokens_per_epoch=per_epoch, steps=steps,
                   warnings=_too_short(cfg, steps, per_epoch, world))


def _too_short(cfg: TrainConfig, steps: Optional[int], per_epoch: Optional[int], world: int) -> list[str]:
    out: list[str] = []
    if not steps:  # unknown, or fewer tokens than one batch: train_sae refuses that with its own error
        return out
    tokens = steps * cfg.batch_size * world
    fixes = []
    if cfg.max_steps is not None and steps == cfg.max_steps:
        fixes.append("raise max_steps")
    if per_epoch is not None and cfg.epochs == MAX_AUTO_EPOCHS:
        fixes.append(f"add prompts (the corpus is repeated at most {MAX_AUTO_EPOCHS} times)")
    elif per_epoch is not None:
        fixes.append("raise epochs (or leave epochs=None and raise train_tokens)")
    if tokens < SHORT_RUN_TOKENS or steps < SHORT_RUN_STEPS:
        out.append(
            f"this run trains {tokens:,} tokens in {steps} steps of {cfg.batch_size * world} (epochs={cfg.epochs}, "
            f"{per_epoch:,} tokens per epoch): too short for the SAE to converge (expect a high FVU); "
            f"{' or '.join(fixes) or 'add prompts'}" if per_epoch is not None else
            f"this run trains {tokens:,} tokens in {steps} steps: too short for the SAE to converge; "
            f"{' or '.join(fixes) or 'add prompts'}")
    if cfg.warmup_steps is not None and steps < 2 * cfg.warmup_steps:
        out.append(f"warmup_steps={cfg.warmup_steps} is more than half of the run's {steps} steps: the learning "
                   "rate never settles; lower warmup_steps (or leave it None: 5% of the steps)")
    return out


@torch.no_grad()
def heldout_fvu(sae: nn.Module, encoder: nn.Module, tokenizer: Any, prompts: list[str],
                cfg: TrainConfig) -> tuple[Optional[float], int]:
    """(FVU of `sae` on the counted tokens of `prompts`, the tokens measured); (None, 0) when none.
    FVU = sum ||x_hat - x||^2 / sum ||x - mean(x)||^2 over all the tokens, as in training."""
    if not prompts:
        return None, 0
    eos = eos_id(encoder, tokenizer)
    err = total = 0.0
    rows: list[torch.Tensor] = []
    for tb in bucketed(tokenizer, prompts, cfg.max_length, eos, cfg.prompt_batch_size, cfg.token_budget):
        hidden = hook_activations(encoder, tb.tokens, cfg.hook, cfg.penultimate_output)
        x = hidden[tb.counted.to(hidden.device)].float()
        rows.append(x.cpu())
    x_all = torch.cat(rows)
    if x_all.shape[0] == 0:
        return None, 0
    dev = next(sae.parameters()).device
    mean = x_all.mean(0)
    for chunk in x_all.split(4096):
        c = chunk.to(dev)
        err += float((sae(c).float() - c).pow(2).sum())
        total += float((chunk - mean).pow(2).sum())
    return err / max(total, 1e-30), int(x_all.shape[0])

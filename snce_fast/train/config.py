"""Training settings (`TrainConfig`, checked by `validate`) and the final `TrainReport`.

docs/training.md describes the settings and the objective they parametrise; the SAE's tensors
and its TopK rule are in docs/method.md.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from snce_fast.checks import parse_hook
from snce_fast.hooks.batching import TOKEN_BUDGET

__all__ = ["RESUME_KEYS", "SettingError", "TrainConfig", "TrainReport"]

B_DEC_INITS = ("median", "mean", "zero")
ENCODER_BACKWARDS = ("auto", "sparse", "dense")
REPORT_WINDOW = 50  # TrainReport's fvu / l0 / aux_loss average this many last steps

# settings that must match for a checkpoint to resume (they change the data order or the state's shapes)
RESUME_KEYS = ("n_latents", "k", "hook", "penultimate_output", "batch_size", "prompt_batch_size", "prompt_window",
               "token_budget", "max_length", "include_bos", "include_padding", "epochs", "shuffle_buffer", "seed",
               "aux_k", "dead_tokens", "holdout")

_POSITIVE = ("batch_size", "prompt_batch_size", "prompt_window", "token_budget", "train_tokens", "aux_k",
             "dead_tokens", "median_iters", "shuffle_buffer", "cache_block", "checkpoint_every", "keep_checkpoints",
             "log_every")
_POSITIVE_OR_NONE = ("max_steps", "max_length", "epochs", "warmup_steps")
_SETTING_REF = re.compile(r"\{(\w+)\}")


class SettingError(ValueError):
    """A `TrainConfig` setting with an invalid value.

    `setting` is the field, `value` its value, `requirement` what it should be; `requirement` may
    name other settings as `{name}`. `str(e)` is "setting=value is invalid: requirement" with the
    names as written; `describe(rename)` lets a front end show them as it calls them (flags).
    """

    def __init__(self, setting: str, value: Any, requirement: str):
        self.setting, self.value, self.requirement = setting, value, requirement
        super().__init__(f"{setting}={value!r} is invalid: {self.describe()}")

    def describe(self, rename: Callable[[str], str] = str) -> str:
        """The requirement with every `{name}` replaced by `rename(name)`."""
        return _SETTING_REF.sub(lambda m: rename(m.group(1)), self.requirement)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float (inf would train NaN weights and cannot be written as JSON)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig:
    """Every training knob; `train_sae(**kwargs)` accepts these names."""

    n_latents: int = 4096
    k: int = 32
    hook: str = "output"
    penultimate_output: bool = False  # SDXL: hook "output" reads hidden_states[-2]
    batch_size: int = 4096  # tokens per step per rank
    prompt_batch_size: int = 64  # at most this many prompts per encoder call
    prompt_window: int = 512  # prompts read, sorted by token length and encoded together
    token_budget: int = TOKEN_BUDGET  # at most this many padded tokens per encoder call
    max_length: Optional[int] = None  # truncation length (default: tokenizer's, 77 for CLIP)
    include_bos: bool = False
    include_padding: bool = False
    epochs: Optional[int] = None  # None: enough passes over the corpus to train `train_tokens` tokens
    train_tokens: int = 4_000_000  # the token budget `epochs=None` aims for (docs/training.md, "Defaults")
    max_steps: Optional[int] = None
    lr: Optional[float] = None  # default 2e-4 / sqrt(n_latents / 2**14)
    warmup_steps: Optional[int] = None  # None: 5% of the run's steps, at most 1000
    holdout: float = 0.02  # share of a sized corpus held out for the final FVU (every 1/holdout-th prompt)
    adam_eps: float = 6.25e-10
    aux_k: int = 512
    aux_coef: float = 1.0 / 32
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    b_dec_init: str = "median"  # median | mean | zero
    median_iters: int = 8
    shuffle_buffer: int = 65536  # tokens held for shuffling (per rank)
    cache_dir: Optional[str] = None  # on-disk activation cache (epoch 0 writes, later epochs read)
    cache_block: int = 4096  # rows per random read from the cache
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 1
    resume: bool = True  # resume from checkpoint_dir/latest when it exists
    seed: int = 0
    device: Optional[str] = None  # default: the encoder's device
    amp: Optional[bool] = None  # bf16 encoder matmul; default: on for CUDA
    encoder_backward: str = "auto"  # sparse | dense | auto (sparse on CPU, dense bf16 on CUDA)
    progress: bool = True
    log_every: int = 1  # history entry every N steps
    encoder_name: Optional[str] = None

    def validate(self) -> None:
        """Raise `SettingError` (a ValueError) naming the first invalid setting; normalises `hook`."""
        self._check_positive("n_latents")
        if not _is_int(self.k) or not 1 <= self.k <= self.n_latents:
            raise SettingError("k", self.k, f"expected 1 <= k <= {{n_latents}} ({self.n_latents})")
        try:
            self.hook = parse_hook(self.hook)
        except ValueError:
            raise SettingError("hook", self.hook, "expected 'output' or 'layer:N' (e.g. layer:8)") from None
        for name in _POSITIVE:
            self._check_positive(name)
        for name in _POSITIVE_OR_NONE:
            if getattr(self, name) is not None:
                self._check_positive(name)
        if not (_is_number(self.holdout) and 0 <= self.holdout <= 0.5):
            raise SettingError("holdout", self.holdout, "expected a share of prompts in [0, 0.5] (0: none)")
        if self.lr is not None and not (_is_number(self.lr) and self.lr > 0):
            raise SettingError("lr", self.lr, "expected a positive finite float")
        if not (_is_number(self.adam_eps) and self.adam_eps > 0):
            raise SettingError("adam_eps", self.adam_eps, "expected a positive finite float")
        if not (_is_number(self.aux_coef) and self.aux_coef >= 0):
            raise SettingError("aux_coef", self.aux_coef, "expected a finite float >= 0")
        if self.b_dec_init not in B_DEC_INITS:
            raise SettingError("b_dec_init", self.b_dec_init, f"expected one of {B_DEC_INITS}")
        if self.encoder_backward not in ENCODER_BACKWARDS:
            raise SettingError("encoder_backward", self.encoder_backward, f"expected one of {ENCODER_BACKWARDS}")

    def memory_bytes(self, d_in: int) -> tuple[int, int]:
        """Bytes a training step needs at input width `d_in`: (the SAE's W_enc, W_dec and biases with
        their gradients and both Adam moments, float32; the [batch_size, n_latents] pre-activations)."""
        n = self.n_latents
        return 4 * 4 * (2 * n * d_in + n + d_in), 4 * self.batch_size * n

    def check_fits(self, d_in: int, limit_bytes: Optional[int], where: str) -> None:
        """Raise `SettingError` naming n_latents (or batch_size) when a step needs more than
        `limit_bytes` (the memory of `where`, e.g. "cpu" or "cuda:0"; None: not known, no check),
        before anything is allocated."""
        if limit_bytes is None:
            return
        weights, pre = self.memory_bytes(d_in)
        if weights + pre <= limit_bytes:
            return
        gb = lambda b: f"{b / 1e9:,.1f} GB"  # noqa: E731
        need = (f"training needs {gb(weights + pre)} ({gb(weights)} for W_enc and W_dec at d_in {d_in} with their "
                f"gradients and Adam state, {gb(pre)} for the pre-activations of {{batch_size}} ({self.batch_size}) "
                f"tokens), more than the {gb(limit_bytes)} of memory on {where}")
        if weights > pre or weights > limit_bytes:
            raise SettingError("n_latents", self.n_latents, f"{need}: lower {{n_latents}}")
        raise SettingError("batch_size", self.batch_size, f"{need}: lower {{batch_size}} (or {{n_latents}})")

    def _check_positive(self, name: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < 1:
            raise SettingError(name, value, "expected a positive int")

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainReport:
    """Final metrics of the whole run, also when it was resumed from a checkpoint (the history, the
    averages and the counters are saved in every checkpoint); `fvu`, `l0`, `aux_loss` average the
    last `window` steps."""

    steps: int = 0
    tokens: int = 0
    fvu: float = float("nan")
    l0: float = float("nan")
    aux_loss: float = float("nan")
    dead_fraction: float = float("nan")  # no fire in the last `dead_tokens` tokens
    never_fired_fraction: float = float("nan")  # no fire since the start of the run (resumes included)
    tokens_per_s: float = 0.0  # over the whole run's training time (every session of a resumed run)
    elapsed_s: float = 0.0  # training seconds of the whole run (up to the resumed checkpoint, then this session)
    window: int = 0
    world_size: int = 1
    device: str = "cpu"
    resumed_from_step: Optional[int] = None
    heldout_fvu: Optional[float] = None  # FVU on the held-out prompts (`holdout`) after the last step
    heldout_prompts: int = 0
    heldout_tokens: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

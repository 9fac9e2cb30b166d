"""Training a TopK SAE on a text encoder's token activations (SPEC sections 1, 3, 5).

Pipeline: prompts -> `activations.tokenize` -> encoder up to the hook point
(`activations.hook_activations`) -> counted positions (BOS and padding excluded by
default) -> a bounded shuffle buffer (memory flat in corpus size) -> optional on-disk
activation cache (raw float32 memmap) reused by later epochs -> TopK SAE steps.

Objective (OpenAI "Scaling and evaluating sparse autoencoders" recipe):
  loss = ||x_hat - x||^2 / ||x - mean(x)||^2                      (normalised MSE = FVU)
       + aux_coef * ||e_hat - e||^2 / ||e||^2                     (AuxK, aux_coef = 1/32)
where e = x - x_hat (detached) and e_hat is decoded (no bias) from the top `aux_k`
pre-activations of dead latents (no fire in the last `dead_tokens` tokens). The
normalisers are sums over the *global* batch (all ranks), so the summed per-rank
gradients equal the gradient on the concatenated batch. Decoder rows are unit-norm:
the gradient component parallel to each row is removed before the Adam step, and rows
are renormalised after it. `b_dec` starts at the geometric median (Weiszfeld) or mean of
the first batch. Adam with linear LR warm-up; the encoder matmul runs in bf16 on CUDA.

Sparse backward: the decode is `F.embedding_bag(indices, W_dec, per_sample_weights=values)`
(a gather of k rows), so the decoder gradient touches only active rows; the encoder's
backward is also sparse by default (`_TopKEncode`): grad W_enc = S^T x_c with S the
[M, n] matrix holding k non-zeros per row, never a dense [M, n] product.

Data parallel: under `torch.distributed` (torchrun; NCCL on GPU, gloo on CPU) each rank
reads prompts i with i % world == rank; gradients are summed with one all-reduce per
step, so every rank keeps identical parameters; training stops when any rank runs out.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from snce_fast.checks import check_k, positive_int
from snce_fast.hooks.activations import counted_mask, encoder_device, eos_id, hook_activations, tokenize
from snce_fast.hooks.points import encoder_width
from snce_fast.checks import parse_hook
from snce_fast.sae.model import SAE

__all__ = ["TrainConfig", "TrainReport", "SAETrainer", "ActivationStream", "train_sae", "geometric_median"]

CKPT_LATEST = "latest"
_B_DEC_INITS = ("median", "mean", "zero")
_ENC_BACKWARDS = ("auto", "sparse", "dense")


# -- configuration and report --------------------------------------------------------
@dataclass
class TrainConfig:
    """Every training knob; `train_sae(**kwargs)` accepts these names."""

    n_latents: int = 4096
    k: int = 32
    hook: str = "output"
    penultimate_output: bool = False  # SDXL: hook "output" reads hidden_states[-2]
    batch_size: int = 4096  # tokens per step per rank
    prompt_batch_size: int = 64  # prompts per encoder call
    max_length: Optional[int] = None  # tokenizer padding length (default: tokenizer's, 77 for CLIP)
    include_bos: bool = False
    include_padding: bool = False
    epochs: int = 1
    max_steps: Optional[int] = None
    lr: Optional[float] = None  # default 2e-4 / sqrt(n_latents / 2**14)
    warmup_steps: int = 1000
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
        positive_int(self.n_latents, "n_latents")
        check_k(self.k, self.n_latents)
        self.hook = parse_hook(self.hook)
        for name in ("batch_size", "prompt_batch_size", "epochs", "warmup_steps", "aux_k", "dead_tokens",
                     "median_iters", "shuffle_buffer", "cache_block", "checkpoint_every", "keep_checkpoints",
                     "log_every"):
            positive_int(getattr(self, name), name)
        if self.max_steps is not None:
            positive_int(self.max_steps, "max_steps")
        if self.max_length is not None:
            positive_int(self.max_length, "max_length")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} is invalid: expected a positive float")
        if not self.aux_coef >= 0:
            raise ValueError(f"aux_coef={self.aux_coef!r} is invalid: expected >= 0")
        if self.b_dec_init not in _B_DEC_INITS:
            raise ValueError(f"b_dec_init={self.b_dec_init!r} is invalid: expected one of {_B_DEC_INITS}")
        if self.encoder_backward not in _ENC_BACKWARDS:
            raise ValueError(f"encoder_backward={self.encoder_backward!r} is invalid: expected one of {_ENC_BACKWARDS}")

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2**14)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# settings that must match for a checkpoint to resume
_RESUME_KEYS = ("n_latents", "k", "hook", "penultimate_output", "batch_size", "prompt_batch_size", "max_length",
                "include_bos", "include_padding", "epochs", "shuffle_buffer", "seed", "aux_k", "dead_tokens")


@dataclass
class TrainReport:
    """Final metrics; `fvu`, `l0`, `aux_loss` average the last `window` steps."""

    steps: int = 0
    tokens: int = 0
    fvu: float = float("nan")
    l0: float = float("nan")
    aux_loss: float = float("nan")
    dead_fraction: float = float("nan")  # no fire in the last `dead_tokens` tokens
    never_fired_fraction: float = float("nan")  # no fire since the start (or the resumed checkpoint's start)
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0
    window: int = 0
    world_size: int = 1
    device: str = "cpu"
    resumed_from_step: Optional[int] = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- distributed helpers ---------------------------------------------------------------
def _dist() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if _dist()[1] > 1:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


# -- the sparse TopK encoder ------------------------------------------------------------
class _TopKEncode(torch.autograd.Function):
    """Dense encode + TopK forward; backward through the k (+ aux_k) selected entries only.

    Returns (values [M, k], indices [M, k], aux_values [M, a], aux_indices [M, a]);
    values are ReLU'd pre-activations. With `sparse`, grad W_enc = (S^T x_c)^T and
    grad x_c = S W_enc^T are computed from the k non-zeros per row of S.
    """

    @staticmethod
    def forward(ctx, x_c, W_enc, b_enc, k, dead, aux_k, amp_dtype, sparse):  # type: ignore[override]
        if amp_dtype is not None:
            with torch.autocast(device_type=x_c.device.type, dtype=amp_dtype):
                pre = torch.addmm(b_enc, x_c, W_enc)
        else:
            pre = torch.addmm(b_enc, x_c, W_enc)
        top = pre.topk(k, dim=-1, sorted=False)
        vals, idx = top.values.float(), top.indices
        if dead is not None and aux_k > 0:
            aux = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1, sorted=False)
            aux_vals, aux_idx = aux.values.float(), aux.indices
        else:
            aux_vals = vals.new_zeros(vals.shape[0], 0)
            aux_idx = idx.new_zeros(idx.shape[0], 0)
        all_idx = torch.cat([idx, aux_idx], 1)
        live = torch.cat([vals, aux_vals], 1) > 0
        ctx.save_for_backward(x_c, W_enc, all_idx, live)
        ctx.sparse = sparse
        ctx.k = k
        ctx.amp_dtype = amp_dtype
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals.relu(), idx, aux_vals.relu(), aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):  # type: ignore[override]
        x_c, W_enc, idx, live = ctx.saved_tensors
        M, d = x_c.shape
        n = W_enc.shape[1]
        if g_vals is None:
            g_vals = torch.zeros(M, ctx.k, device=x_c.device)
        if g_aux is None:
            g_aux = torch.zeros(M, idx.shape[1] - ctx.k, device=x_c.device)
        g = torch.cat([g_vals, g_aux], 1).float() * live  # [M, k + a]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n, device=x_c.device, dtype=torch.float32).index_add_(0, idx.flatten(), g.flatten())
        if ctx.sparse:
            if ctx.needs_input_grad[1]:
                rows = torch.arange(M, device=x_c.device).repeat_interleave(idx.shape[1])
                S_t = torch.sparse_coo_tensor(
                    torch.stack([idx.flatten(), rows]), g.flatten(), (n, M), check_invariants=False
                )
                grad_W = torch.sparse.mm(S_t, x_c.float()).t()
            if ctx.needs_input_grad[0]:
                grad_x = F.embedding_bag(idx, W_enc.t().float().contiguous(), per_sample_weights=g, mode="sum")
        else:
            # scatter_add: a latent may be in both the main and the aux top-k
            G = torch.zeros(M, n, device=x_c.device, dtype=torch.float32).scatter_add_(1, idx, g)
            amp = ctx.amp_dtype is not None
            with torch.autocast(device_type=x_c.device.type, dtype=ctx.amp_dtype or torch.bfloat16, enabled=amp):
                if ctx.needs_input_grad[1]:
                    grad_W = x_c.t() @ G
                if ctx.needs_input_grad[0]:
                    grad_x = G @ W_enc.t()
            grad_x = grad_x.float() if grad_x is not None else None
        if grad_W is not None:
            grad_W = grad_W.to(W_enc.dtype)
        return grad_x, grad_W, grad_b, None, None, None, None, None


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """`sum_j values[m, j] * W_dec[indices[m, j]]` as an embedding-bag gather (sparse backward)."""
    if indices.shape[1] == 0:
        return values.new_zeros(values.shape[0], W_dec.shape[1])
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 8, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld iterations for the point minimising the summed distance to the rows of x."""
    x = x.float()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


# -- one optimisation step -------------------------------------------------------------
class SAETrainer:
    """Holds the SAE, Adam, the step counter and the per-latent "tokens since fired" counters.

    `step(x)` does one step on this rank's batch x [B, d] (or None when this rank has no
    data left: every rank then returns None). Collectives run only under torch.distributed.
    """

    def __init__(self, sae: SAE, cfg: TrainConfig):
        self.sae = sae
        self.cfg = cfg
        dev = sae.W_enc.device
        self.device = dev
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=cfg.adam_eps)
        self.step_num = 0
        self.tokens = 0
        self.since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=dev)
        self.ever_fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=dev)
        amp = cfg.amp if cfg.amp is not None else dev.type == "cuda"
        self.amp_dtype: Optional[torch.dtype] = torch.bfloat16 if amp else None
        eb = cfg.encoder_backward
        self.sparse_backward = eb == "sparse" or (eb == "auto" and dev.type != "cuda")

    def lr_at(self, step: int) -> float:
        return self.cfg.learning_rate * min(1.0, (step + 1) / self.cfg.warmup_steps)

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """b_dec <- geometric median / mean of `sample` (rank 0's, broadcast to all ranks)."""
        if self.cfg.b_dec_init == "zero":
            return
        s = sample.float().to(self.device)
        b = geometric_median(s, self.cfg.median_iters) if self.cfg.b_dec_init == "median" else s.mean(0)
        if _dist()[1] > 1:
            torch.distributed.broadcast(b, src=0)
        self.sae.b_dec.copy_(b.to(self.sae.b_dec.dtype))

    def _dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.cfg.dead_tokens

    def step(self, x: Optional[torch.Tensor]) -> Optional[dict[str, float]]:
        sae, cfg = self.sae, self.cfg
        d, n = sae.d_in, sae.n_latents
        world = _dist()[1]
        # 1. global batch statistics (and "does every rank have data?")
        stats = torch.zeros(3 + d, dtype=torch.float64, device=self.device)
        if x is not None:
            x = x.to(self.device, torch.float32)
            stats[0] = 1.0
            stats[1] = x.shape[0]
            stats[2] = x.double().pow(2).sum()
            stats[3:] = x.double().sum(0)
        _all_reduce(stats)
        have, n_tok = (int(v) for v in stats[:2].tolist())  # one host sync
        if have < world:
            return None
        count = stats[1]
        total_var = (stats[2] - stats[3:].pow(2).sum() / count).clamp_min(1e-12)

        # 2. forward
        dead = self._dead_mask()
        n_dead = int(dead.sum().item())
        aux_k = min(cfg.aux_k, n_dead) if cfg.aux_coef > 0 else 0
        x_c = x - sae.b_dec
        vals, idx, aux_vals, aux_idx = _TopKEncode.apply(
            x_c, sae.W_enc, sae.b_enc, sae.k, dead if aux_k > 0 else None, aux_k, self.amp_dtype, self.sparse_backward
        )
        x_hat = sparse_decode(vals, idx, sae.W_dec) + sae.b_dec
        err = x_hat - x
        l2 = err.pow(2).sum()
        fired = torch.zeros(n, dtype=torch.bool, device=self.device)
        fired[idx[vals > 0]] = True
        # 3. global residual norm (AuxK normaliser), metrics and fired latents
        post = torch.zeros(3 + n, dtype=torch.float64, device=self.device)
        resid = (-err).detach()
        if aux_k > 0:
            post[0] = resid.double().pow(2).sum()
        post[1] = l2.detach().double()
        post[2] = (vals > 0).sum().double()
        post[3:] = fired.double()
        _all_reduce(post)
        loss = l2 / total_var.float()
        aux_loss = torch.zeros((), device=self.device)
        if aux_k > 0:
            e_hat = sparse_decode(aux_vals, aux_idx, sae.W_dec)
            aux_loss = (e_hat - resid).pow(2).sum() / post[0].float().clamp_min(1e-12)
            loss = loss + cfg.aux_coef * aux_loss
        # 4. backward, gradient all-reduce (sum: the normalisers are already global)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        params = [p for p in sae.parameters()]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if world > 1:
            flat = torch.cat([p.grad.flatten() for p in params])
            _all_reduce(flat)
            off = 0
            for p in params:
                p.grad.copy_(flat[off : off + p.numel()].view_as(p))
                off += p.numel()
        # aux loss reported as the global sum of per-rank terms (each already globally normalised)
        aux_report = aux_loss.detach().double().reshape(1)
        _all_reduce(aux_report)
        # 5. keep decoder rows unit-norm: drop the gradient's parallel component, step, renormalise
        with torch.no_grad():
            W, g = sae.W_dec, sae.W_dec.grad
            g.sub_((g * W).sum(1, keepdim=True) * W)
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.step_num)
            self.opt.step()
            W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))
            fired_all = post[3:] > 0
            self.since_fired += n_tok
            self.since_fired[fired_all] = 0
            self.ever_fired |= fired_all
        self.step_num += 1
        self.tokens += n_tok
        fvu, aux_v, l0, dead_frac = torch.stack([  # one host sync for the metrics
            post[1] / total_var, aux_report[0], post[2] / count, self._dead_mask().double().mean()
        ]).tolist()
        return {
            "step": self.step_num,
            "loss": fvu + cfg.aux_coef * aux_v,
            "fvu": fvu,
            "aux_loss": aux_v,
            "l0": l0,
            "dead_fraction": dead_frac,
            "lr": self.lr_at(self.step_num - 1),
            "tokens": self.tokens,
        }

    # checkpoint state (tensors and plain values only; loads with weights_only=True)
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.opt.state_dict(),
            "step": self.step_num,
            "tokens": self.tokens,
            "since_fired": self.since_fired.cpu(),
            "ever_fired": self.ever_fired.cpu(),
            "torch_rng": torch.get_rng_state(),
            "world_size": _dist()[1],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.opt.load_state_dict(sd["optimizer"])
        self.step_num = int(sd["step"])
        self.tokens = int(sd["tokens"])
        self.since_fired = sd["since_fired"].to(self.device)
        self.ever_fired = sd["ever_fired"].to(self.device)
        torch.set_rng_state(sd["torch_rng"])


# -- activation stream ------------------------------------------------------------------
class ActivationStream:
    """Prompts -> hook activations of counted tokens -> shuffled batches of `batch_size` rows.

    A shuffle buffer of `shuffle_buffer` rows (plus at most one encoder chunk) bounds memory.
    Its whole state (epoch, prompts consumed, buffer rows, RNG, cache rows written) is in
    `state_dict()`, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        prompts: Iterable[str],
        cfg: TrainConfig,
        d: int,
        device: torch.device,
    ):
        self.encoder, self.tokenizer, self.prompts, self.cfg, self.d = encoder, tokenizer, prompts, cfg, d
        self.device = device
        self.rank, self.world = _dist()
        self.eos = eos_id(encoder, tokenizer)
        self.gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.rank)
        self.epoch = 0
        self.pos = 0  # prompts (epoch 0 / no cache) or cache blocks consumed in this epoch
        self.buf = torch.empty(0, d, device=device)
        self.n = 0
        self.final = False
        self.tokens_in = 0
        self.prompts_in = 0
        self.cache_rows = 0
        self._it: Optional[Iterator[str]] = None
        self._cache_file: Optional[Any] = None
        self._cache_map: Optional[np.memmap] = None
        self._block_order: Optional[torch.Tensor] = None
        self.cache_path = (Path(cfg.cache_dir) / f"activations_rank{self.rank}.f32") if cfg.cache_dir else None

    # source of chunks
    def _prompt_iter(self) -> Iterator[str]:
        it = iter(self.prompts)
        if self.epoch > 0 and it is self.prompts:
            raise ValueError(
                f"epochs={self.cfg.epochs} needs prompts that can be iterated again (a list or a re-iterable "
                "corpus), or cache_dir= to replay activations from disk; got a one-shot iterator"
            )
        if self.world > 1:
            it = itertools.islice(it, self.rank, None, self.world)
        return itertools.islice(it, self.pos, None)

    def _uses_cache_now(self) -> bool:
        return self.cache_path is not None and self.epoch > 0

    def _next_chunk(self) -> Optional[torch.Tensor]:
        if self._uses_cache_now():
            return self._next_cache_chunk()
        if self._it is None:
            self._it = self._prompt_iter()
        batch = list(itertools.islice(self._it, self.cfg.prompt_batch_size))
        if not batch:
            self._it = None
            return None
        for i, p in enumerate(batch):
            if not isinstance(p, str):
                raise TypeError(
                    f"prompt {self.pos + i} (rank {self.rank}) is a {type(p).__name__}, not a str: {p!r:.80}"
                )
        chunk = self._activations(batch)
        self.pos += len(batch)
        self.prompts_in += len(batch)
        if self.cache_path is not None and self.epoch == 0:
            self._append_cache(chunk)
        return chunk

    @torch.no_grad()
    def _activations(self, batch: list[str]) -> torch.Tensor:
        cfg = self.cfg
        toks = tokenize(self.tokenizer, batch, cfg.max_length)
        hidden = hook_activations(self.encoder, toks, cfg.hook, cfg.penultimate_output)  # [B, L, d']
        if hidden.shape[-1] != self.d:
            raise ValueError(
                f"the encoder's activations at hook {cfg.hook!r} have width {hidden.shape[-1]}, "
                f"but the SAE has d_in={self.d}"
            )
        ids = toks["input_ids"]
        L = ids.shape[1]
        pos = torch.arange(L).expand_as(ids)
        if cfg.include_padding:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            mask = counted_mask(ids, toks.get("attention_mask"), self.eos) | (pos == 0)
        if not cfg.include_bos:
            mask &= pos >= 1
        rows = hidden[mask.to(hidden.device)].to(self.device, torch.float32)
        if rows.numel() and not bool(torch.isfinite(rows).all()):
            bad = (~torch.isfinite(rows)).any(-1).nonzero()[0, 0].item()
            raise ValueError(
                f"the encoder produced NaN/inf activations at hook {cfg.hook!r} for prompts "
                f"{self.pos}..{self.pos + len(batch) - 1} of rank {self.rank} (first bad token row {bad}); "
                "check the encoder's weights and dtype (fp16 overflow?)"
            )
        return rows

    def _append_cache(self, chunk: torch.Tensor) -> None:
        assert self.cache_path is not None
        if self._cache_file is None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            mode = "r+b" if self.cache_path.exists() else "wb"
            f = open(self.cache_path, mode)
            f.truncate(self.cache_rows * self.d * 4)  # drop rows written after the last checkpoint
            f.seek(0, os.SEEK_END)
            self._cache_file = f
        self._cache_file.write(chunk.cpu().numpy().astype(np.float32, copy=False).tobytes())
        self.cache_rows += chunk.shape[0]

    def _next_cache_chunk(self) -> Optional[torch.Tensor]:
        assert self.cache_path is not None
        if self._cache_map is None:
            if self._cache_file is not None:
                self._cache_file.close()
                self._cache_file = None
            if self.cache_rows == 0:
                return None
            self._cache_map = np.memmap(self.cache_path, dtype=np.float32, mode="r", shape=(self.cache_rows, self.d))
        if self._block_order is None:
            n_blocks = -(-self.cache_rows // self.cfg.cache_block)
            g = torch.Generator().manual_seed(self.cfg.seed * 104729 + self.epoch * 31 + self.rank)
            self._block_order = torch.randperm(n_blocks, generator=g)
        if self.pos >= len(self._block_order):
            self._block_order = None
            return None
        b = int(self._block_order[self.pos])
        self.pos += 1
        B = self.cfg.cache_block
        return torch.from_numpy(np.array(self._cache_map[b * B : (b + 1) * B])).to(self.device)

    # buffer
    def _push(self, chunk: torch.Tensor) -> None:
        m = chunk.shape[0]
        if self.n + m > self.buf.shape[0]:
            grown = torch.empty(self.n + m, self.d, device=self.device)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : self.n + m] = chunk
        self.n += m
        self.tokens_in += m

    def _pop(self, B: int) -> torch.Tensor:
        sel = torch.randperm(self.n, generator=self.gen)[:B]
        sel_d = sel.to(self.device)
        out = self.buf[sel_d].clone()
        tail = self.n - B
        taken = torch.zeros(self.n, dtype=torch.bool)
        taken[sel] = True
        holes = sel[sel < tail]
        fillers = torch.arange(tail, self.n)[~taken[tail:]]
        if holes.numel():
            self.buf[holes.to(self.device)] = self.buf[fillers.to(self.device)]
        self.n = tail
        return out

    def next_batch(self) -> Optional[torch.Tensor]:
        """The next shuffled batch [batch_size, d], or None when the data is spent."""
        B = self.cfg.batch_size
        while True:
            if self.n >= max(B, self.cfg.shuffle_buffer) or (self.final and self.n >= B):
                return self._pop(B)
            if self.final:
                return None
            chunk = self._next_chunk()
            if chunk is None:  # this epoch's source is spent
                if self.epoch == 0 and self.tokens_in == 0:
                    raise ValueError(
                        f"the corpus gave no tokens on rank {self.rank} (empty prompts, or every token excluded "
                        f"by include_bos={self.cfg.include_bos}/include_padding={self.cfg.include_padding})"
                    )
                if self.epoch + 1 < self.cfg.epochs:
                    self.epoch += 1
                    self.pos = 0
                else:
                    self.final = True
                continue
            self._push(chunk)

    def close(self) -> None:
        if self._cache_file is not None:
            self._cache_file.flush()
            self._cache_file.close()
            self._cache_file = None
        self._cache_map = None

    def state_dict(self) -> dict[str, Any]:
        if self._cache_file is not None:
            self._cache_file.flush()
            os.fsync(self._cache_file.fileno())
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "n": self.n,
            "buffer": self.buf[: self.n].cpu().clone(),
            "final": self.final,
            "tokens_in": self.tokens_in,
            "prompts_in": self.prompts_in,
            "cache_rows": self.cache_rows,
            "gen": self.gen.get_state(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.close()
        self.epoch, self.pos, self.n = int(sd["epoch"]), int(sd["pos"]), int(sd["n"])
        self.buf = sd["buffer"].to(self.device, torch.float32).clone()
        self.final = bool(sd["final"])
        self.tokens_in, self.prompts_in = int(sd["tokens_in"]), int(sd["prompts_in"])
        self.cache_rows = int(sd["cache_rows"])
        self.gen.set_state(sd["gen"])
        self._it = None
        self._block_order = None
        if self.cache_path is not None and self.epoch == 0 and self.cache_path.exists():
            with open(self.cache_path, "r+b") as f:
                f.truncate(self.cache_rows * self.d * 4)


# -- checkpoints --------------------------------------------------------------------------
def _atomic_write(path: Path, writer: Callable[[str], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_checkpoint(root: Path, trainer: SAETrainer, stream: ActivationStream, cfg: TrainConfig) -> Path:
    """Write step_NNNNNNNN/ (sae/, trainer.pt, data_rank*.pt) via a temp dir + rename, then `latest`."""
    rank, _ = _dist()
    name = f"step_{trainer.step_num:09d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    torch.save(stream.state_dict(), tmp / f"data_rank{rank}.pt")
    if rank == 0:
        trainer.sae.save(str(tmp / "sae"))
        state = trainer.state_dict()
        state["config"] = json.dumps(cfg.to_dict())
        torch.save(state, tmp / "trainer.pt")
    _barrier()
    if rank == 0:
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(root / CKPT_LATEST, lambda p: Path(p).write_text(name + "\n"))
        old = sorted(q for q in root.glob("step_*") if q.is_dir() and q.name != name)
        for q in old[: max(0, len(old) - (cfg.keep_checkpoints - 1))]:
            shutil.rmtree(q, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(root: Union[str, os.PathLike]) -> Optional[Path]:
    """The directory `root/latest` names, or None."""
    p = Path(root) / CKPT_LATEST
    if not p.is_file():
        return None
    d = Path(root) / p.read_text().strip()
    if not (d / "trainer.pt").is_file():
        raise FileNotFoundError(f"checkpoint {str(d)!r} named by {str(p)!r} is incomplete (no trainer.pt)")
    return d


def _load_checkpoint(ckpt: Path, trainer: SAETrainer, stream: ActivationStream, cfg: TrainConfig) -> None:
    state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    saved = json.loads(state["config"])
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in _RESUME_KEYS if saved.get(k) != getattr(cfg, k)}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {str(ckpt)!r}: settings differ ({desc}); use another checkpoint_dir")
    rank, world = _dist()
    if int(state.get("world_size", 1)) != world:
        raise ValueError(f"cannot resume from {str(ckpt)!r}: it was written by {state.get('world_size')} ranks, "
                         f"this run has {world}")
    data = ckpt / f"data_rank{rank}.pt"
    if not data.is_file():
        raise FileNotFoundError(f"cannot resume rank {rank} of {world}: {str(data)!r} is missing (world size changed?)")
    sae = SAE.load(str(ckpt / "sae"), device=trainer.device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(trainer.sae, name).copy_(getattr(sae, name))
    trainer.load_state_dict(state)
    stream.load_state_dict(torch.load(data, map_location="cpu", weights_only=True))


# -- the public entry point -----------------------------------------------------------------
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
    on_step: Optional[Callable[[dict[str, float]], None]] = None,
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
    if isinstance(prompts, str):
        raise TypeError("prompts is a single str: pass a list of prompts (or an iterable of str)")
    if hasattr(prompts, "__len__") and len(prompts) == 0:  # type: ignore[arg-type]
        raise ValueError("prompts is empty: the SAE needs a corpus of at least one prompt")
    if cfg.epochs > 1 and cfg.cache_dir is None and iter(prompts) is prompts:
        raise ValueError(
            f"epochs={cfg.epochs} needs prompts that can be iterated again (a list or a re-iterable corpus), "
            "or cache_dir= to replay activations from disk; got a one-shot iterator"
        )

    width = encoder_width(encoder)
    want = d_in if d_in is not None else (sae.d_in if sae is not None else width)
    if want != width:
        raise ValueError(f"encoder width {width} ({type(encoder).__name__}) != SAE d_in {want}")
    device = torch.device(cfg.device) if cfg.device else encoder_device(encoder)
    rank, world = _dist()
    if sae is None:
        sae = SAE(width, cfg.n_latents, cfg.k, hook=cfg.hook, encoder=cfg.encoder_name or _encoder_name(encoder))
        sae.reset_parameters(generator=torch.Generator().manual_seed(cfg.seed))
    sae = sae.to(device)
    sae.train()

    trainer = SAETrainer(sae, cfg)
    stream = ActivationStream(encoder, tokenizer, prompts, cfg, width, device)
    ckroot = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    resumed: Optional[int] = None
    if ckroot is not None and cfg.resume:
        ck = latest_checkpoint(ckroot)
        if ck is not None:
            _load_checkpoint(ck, trainer, stream, cfg)
            resumed = trainer.step_num

    report = TrainReport(world_size=world, device=str(device), resumed_from_step=resumed, config=cfg.to_dict())
    was_training = encoder.training
    encoder.eval()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=trainer.step_num, unit="step", disable=not cfg.progress or rank != 0)
    recent: list[dict[str, float]] = []
    t0 = time.perf_counter()
    tokens0 = trainer.tokens
    try:
        first = resumed is None
        while cfg.max_steps is None or trainer.step_num < cfg.max_steps:
            x = stream.next_batch()
            if first:
                if x is not None or world > 1:
                    trainer.init_b_dec(x if x is not None else torch.zeros(1, width))
                first = False
            ts = time.perf_counter()
            metrics = trainer.step(x)
            if metrics is None:
                break
            now = time.perf_counter()
            metrics["step_s"] = now - ts
            dt = now - t0
            metrics["tokens_per_s"] = (trainer.tokens - tokens0) / max(dt, 1e-9)
            recent = (recent + [metrics])[-50:]
            if trainer.step_num % cfg.log_every == 0:
                report.history.append(metrics)
            bar.update(1)
            bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}",
                            dead=f"{metrics['dead_fraction']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if ckroot is not None and trainer.step_num % cfg.checkpoint_every == 0:
                _save_checkpoint(ckroot, trainer, stream, cfg)
            if on_step is not None:
                on_step(metrics)
        if trainer.step_num == 0:
            raise ValueError(
                f"the corpus gave only {stream.tokens_in} tokens on rank {rank} (after excluding BOS/padding), "
                f"fewer than batch_size={cfg.batch_size}: lower batch_size or add prompts"
            )
        if ckroot is not None and (resumed is None or trainer.step_num != resumed):
            _save_checkpoint(ckroot, trainer, stream, cfg)
    finally:
        bar.close()
        stream.close()
        encoder.train(was_training)

    elapsed = time.perf_counter() - t0
    report.steps, report.tokens, report.elapsed_s = trainer.step_num, trainer.tokens, elapsed
    report.tokens_per_s = (trainer.tokens - tokens0) / max(elapsed, 1e-9)
    report.window = len(recent)
    if recent:
        for key in ("fvu", "l0", "aux_loss"):
            setattr(report, key, float(np.mean([m[key] for m in recent])))
    report.dead_fraction = float((trainer.since_fired >= cfg.dead_tokens).float().mean())
    report.never_fired_fraction = float((~trainer.ever_fired).float().mean())
    sae.eval()
    sae.train_report = report  # type: ignore[attr-defined]
    return (sae, report) if return_report else sae


def _encoder_name(encoder: nn.Module) -> Optional[str]:
    cfg = getattr(encoder, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None)
    return str(name) if name else type(encoder).__name__

"""One optimisation step of a TopK SAE (`SAETrainer`). The SAE is described in docs/method.md, the
objective in docs/training.md ("Objective", "Distributed training").

loss = ||x_hat - x||^2 / ||x - mean(x)||^2 (the FVU) + aux_coef * ||e_hat - e||^2 / ||e||^2 (AuxK),
where e = x - x_hat (detached) and e_hat is decoded (no bias) from the top `aux_k` pre-activations
of dead latents (no fire in the last `dead_tokens` tokens). The normalisers are sums over the
*global* batch (all ranks), so the summed per-rank gradients equal the gradient on the
concatenated batch. Decoder rows are unit-norm: the gradient component parallel to each row is
removed before the Adam step and rows are renormalised after it. `b_dec` starts at the geometric
median (Weiszfeld) or the mean of the first batch. Adam with linear LR warm-up; the encoder matmul
runs in bf16 on CUDA.

Under torch.distributed the differentiable part runs inside `DistributedDataParallel`, whose
gradient all-reduce is set to a sum (not DDP's default mean) because the loss is already
normalised over the global batch; every rank therefore applies the same update.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from snce_fast.distributed import all_reduce, broadcast, is_distributed, rank_and_world
from snce_fast.sae.model import SAE
from snce_fast.train.config import TrainConfig
from snce_fast.train.plan import WARMUP_MAX
from snce_fast.train.topk_autograd import sparse_decode, topk_encode

__all__ = ["ENCODER_INIT_NORM", "SAETrainer", "geometric_median", "init_for_training"]

# (this rank's x as float32, global token count, the same as a tensor, global ||x - mean(x)||^2)
_GlobalBatch = tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]


# Column norm of W_enc at init (W_enc = W_dec^T scaled): the row norm of torch.nn.Linear's default init,
# as eai-sparsify starts. Measured on MiniLM activations (docs/training.md, "Init"): held-out FVU 0.274
# after 250 steps of 4,096 tokens vs 0.313 with unit-norm columns.
ENCODER_INIT_NORM = 3 ** -0.5


@torch.no_grad()
def init_for_training(sae: SAE, seed: int) -> SAE:
    """Random unit-norm decoder rows, W_enc = ENCODER_INIT_NORM * W_dec^T, zero biases (b_dec is set
    from the first batch by `SAETrainer.init_b_dec`)."""
    sae.reset_parameters(generator=torch.Generator().manual_seed(seed))
    sae.W_enc.mul_(ENCODER_INIT_NORM)
    return sae


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 8, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld iterations for the point minimising the summed distance to the rows of x."""
    x = x.float()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


def _sum_gradients(_state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: all-reduce a gradient bucket (a `dist.GradBucket`) as a sum; DDP's
    default divides by the world size, but the loss normalisers already span every rank. Returns a
    `torch.futures.Future` of the summed buffer. No annotations: DDP compares them with the real
    classes, and this module's postponed (string) annotations would not match."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class _Objective(nn.Module):
    """The differentiable part of a step, a module so that DDP can wrap it.

    `forward(x, total_var, dead, aux_k, aux_coef)` returns (loss, aux_loss, post) where `post`
    (float64, summed over ranks) holds [AuxK normaliser ||e||^2, ||x_hat - x||^2, active codes,
    fired flag per latent...].
    """

    def __init__(self, sae: SAE, amp_dtype: Optional[torch.dtype], sparse_backward: bool):
        super().__init__()
        self.sae = sae
        self.amp_dtype = amp_dtype
        self.sparse_backward = sparse_backward

    def forward(self, x: torch.Tensor, total_var: torch.Tensor, dead: Optional[torch.Tensor], aux_k: int,
                aux_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sae = self.sae
        x_c = x - sae.b_dec
        vals, idx, aux_vals, aux_idx = topk_encode(
            x_c, sae.W_enc, sae.b_enc, sae.k, dead, aux_k, self.amp_dtype, self.sparse_backward
        )
        x_hat = sparse_decode(vals, idx, sae.W_dec) + sae.b_dec
        err = x_hat - x
        l2 = err.pow(2).sum()
        resid = (-err).detach()
        post = self._global_sums(resid, l2, vals, idx, aux_k)
        loss = l2 / total_var.float()
        aux_loss = torch.zeros((), device=x.device)
        if aux_k > 0:
            e_hat = sparse_decode(aux_vals, aux_idx, sae.W_dec)
            aux_loss = (e_hat - resid).pow(2).sum() / post[0].float().clamp_min(1e-12)
            loss = loss + aux_coef * aux_loss
        return loss, aux_loss, post

    def _global_sums(self, resid: torch.Tensor, l2: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor,
                     aux_k: int) -> torch.Tensor:
        """The AuxK normaliser, the metrics and the fired latents, summed over ranks (one all-reduce)."""
        n = self.sae.n_latents
        fired = torch.zeros(n, dtype=torch.bool, device=vals.device)
        fired[idx[vals > 0]] = True
        post = torch.zeros(3 + n, dtype=torch.float64, device=vals.device)
        if aux_k > 0:
            post[0] = resid.double().pow(2).sum()
        post[1] = l2.detach().double()
        post[2] = (vals > 0).sum().double()
        post[3:] = fired.double()
        return all_reduce(post)


class SAETrainer:
    """Holds the SAE, Adam, the step counter and the per-latent "tokens since fired" counters.

    `step(x)` does one step on this rank's batch x [B, d] (or None when this rank has no
    data left: every rank then returns None). Collectives run only under torch.distributed,
    where the SAE's gradients are summed by DistributedDataParallel.
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
        objective = _Objective(sae, self.amp_dtype, self.sparse_backward)
        self._objective: nn.Module = objective
        if is_distributed():  # a collective: every rank constructs its trainer
            ddp = DistributedDataParallel(objective, device_ids=[dev] if dev.type == "cuda" else None)
            ddp.register_comm_hook(None, _sum_gradients)
            self._objective = ddp

    def lr_at(self, step: int) -> float:
        return self.cfg.learning_rate * min(1.0, (step + 1) / (self.cfg.warmup_steps or WARMUP_MAX))

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """b_dec <- geometric median / mean of `sample` (rank 0's, broadcast to all ranks)."""
        if self.cfg.b_dec_init == "zero":
            return
        s = sample.float().to(self.device)
        b = geometric_median(s, self.cfg.median_iters) if self.cfg.b_dec_init == "median" else s.mean(0)
        broadcast(b, src=0)
        self.sae.b_dec.copy_(b.to(self.sae.b_dec.dtype))

    def _dead_mask(self) -> torch.Tensor:
        return self.since_fired >= self.cfg.dead_tokens

    def step(self, x: Optional[torch.Tensor]) -> Optional[dict[str, float]]:
        """One step on this rank's batch; None (on every rank) once any rank has no batch left."""
        batch = self._global_batch(x)
        if batch is None:
            return None
        x, n_tok, count, total_var = batch
        cfg = self.cfg
        dead = self._dead_mask()
        n_dead = int(dead.sum().item())
        aux_k = min(cfg.aux_k, n_dead) if cfg.aux_coef > 0 else 0
        loss, aux_loss, post = self._objective(x, total_var, dead if aux_k > 0 else None, aux_k, cfg.aux_coef)
        self.opt.zero_grad(set_to_none=False)
        loss.backward()  # under DDP this also sums the gradients over ranks
        for p in self.sae.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # aux loss reported as the global sum of per-rank terms (each already globally normalised)
        aux_report = all_reduce(aux_loss.detach().double().reshape(1))
        self._update(post[3:] > 0, n_tok)
        return self._metrics(post, aux_report, total_var, count)

    def _global_batch(self, x: Optional[torch.Tensor]) -> Optional[_GlobalBatch]:
        """(x as float32 on the device, global token count, the same as a tensor, global total variance
        ||x - mean(x)||^2) from one all-reduce; None when some rank has no batch."""
        d = self.sae.d_in
        stats = torch.zeros(3 + d, dtype=torch.float64, device=self.device)
        if x is not None:
            x = x.to(self.device, torch.float32)
            stats[0] = 1.0
            stats[1] = x.shape[0]
            stats[2] = x.double().pow(2).sum()
            stats[3:] = x.double().sum(0)
        all_reduce(stats)
        have, n_tok = (int(v) for v in stats[:2].tolist())  # one host sync
        if have < rank_and_world()[1] or x is None:
            return None
        count = stats[1]
        total_var = (stats[2] - stats[3:].pow(2).sum() / count).clamp_min(1e-12)
        return x, n_tok, count, total_var

    @torch.no_grad()
    def _update(self, fired: torch.Tensor, n_tok: int) -> None:
        """Unit-norm decoder rows (drop the gradient's parallel component, Adam step, renormalise),
        then the step, token and fired-latent counters."""
        W, g = self.sae.W_dec, self.sae.W_dec.grad
        g.sub_((g * W).sum(1, keepdim=True) * W)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_num)
        self.opt.step()
        W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.since_fired += n_tok
        self.since_fired[fired] = 0
        self.ever_fired |= fired
        self.step_num += 1
        self.tokens += n_tok

    def _metrics(self, post: torch.Tensor, aux_report: torch.Tensor, total_var: torch.Tensor,
                 count: torch.Tensor) -> dict[str, float]:
        fvu, aux_v, l0, dead_frac = torch.stack([  # one host sync for the metrics
            post[1] / total_var, aux_report[0], post[2] / count, self._dead_mask().double().mean()
        ]).tolist()
        return {
            "step": self.step_num,
            "loss": fvu + self.cfg.aux_coef * aux_v,
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
            "world_size": rank_and_world()[1],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.opt.load_state_dict(sd["optimizer"])
        self.step_num = int(sd["step"])
        self.tokens = int(sd["tokens"])
        self.since_fired = sd["since_fired"].to(self.device)
        self.ever_fired = sd["ever_fired"].to(self.device)
        torch.set_rng_state(sd["torch_rng"])

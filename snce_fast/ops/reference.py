"""Eager PyTorch ground truth for every SNCE operation (docs/method.md).

Everything here is written for clarity, computes in float32 whatever the input dtype,
and is what the Triton kernels and the C++ extension are tested against. Each function
takes the SAE explicitly so it can also be called on bare weight holders.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Protocol, Sequence, Union

import torch

from snce_fast.checks import (
    Neurons,
    as_neuron_list,
    check_activations,
    check_codes,
    check_edit_args,
    given_neurons,
    positive_int,
)


class SAEWeights(Protocol):
    W_enc: torch.Tensor  # [d, n]
    b_enc: torch.Tensor  # [n]
    W_dec: torch.Tensor  # [n, d]
    b_dec: torch.Tensor  # [d]
    k: int


def pre_activations(x: torch.Tensor, sae: SAEWeights) -> torch.Tensor:
    """`(x - b_dec) @ W_enc + b_enc` in float32, shape [..., n]."""
    x32 = x.float() - sae.b_dec.float()
    return x32 @ sae.W_enc.float() + sae.b_enc.float()


def folded_encoder_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """`b_enc - b_dec @ W_enc` in float32 [n]: with it, `pre = x @ W_enc + bias` needs no `x - b_dec`
    (exact up to fp32 rounding). 16-bit W_enc is upcast in column blocks (at most d x 65536 in fp32)."""
    W, b_enc, b_dec = W_enc.detach(), b_enc.detach(), b_dec.detach()
    if W.dtype == torch.float32:
        return b_enc.float() - b_dec.float() @ W
    step = 1 << 16
    parts = [b_dec.float() @ W[:, i:i + step].float() for i in range(0, W.shape[1], step)]
    return b_enc.float() - torch.cat(parts)


def decoder_rows(sae: SAEWeights, targets: list[int]) -> torch.Tensor:
    """`W_dec[targets]` [T, d], from the full decoder or from the rows a slim holder stores
    (`W_dec_targets` for `decoder_targets`, see snce_fast.sae.ErasureSAE)."""
    rows = getattr(sae, "W_dec_targets", None)
    if rows is None:
        return sae.W_dec[list(targets)]
    stored = list(sae.decoder_targets)
    missing = [j for j in targets if j not in stored]
    if missing:
        raise ValueError(f"latent {missing[0]} has no stored decoder row: this erasure keeps rows for {stored}")
    pos = torch.tensor([stored.index(j) for j in targets], dtype=torch.long, device=rows.device)
    return rows.index_select(0, pos)


def _need_full_decoder(sae: SAEWeights, what: str) -> None:
    if getattr(sae, "W_dec", None) is None:
        raise ValueError(f"{what} needs the whole decoder W_dec, but this SAE keeps only the target rows "
                         "(a slim erasure supports mode='residual' only)")


def encode(x: torch.Tensor, sae: SAEWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK encode: the k largest pre-activations per token, then ReLU.

    Returns `(values, indices)`, each [..., k]; values in x's dtype, indices int32.
    An entry <= 0 inside the top k comes out as value 0 (it does not fire).
    """
    check_activations(x, sae.W_enc.shape[0])
    top = pre_activations(x, sae).topk(sae.k, dim=-1, sorted=True)
    return top.values.relu().to(x.dtype), top.indices.to(torch.int32)


def decode(values: torch.Tensor, indices: torch.Tensor, sae: SAEWeights) -> torch.Tensor:
    """Sparse decode `z @ W_dec + b_dec` as a weighted gather of k rows of W_dec."""
    check_codes(values, indices)
    rows = sae.W_dec.float()[indices.long()]  # [..., k, d]
    out = (values.float().unsqueeze(-1) * rows).sum(-2) + sae.b_dec.float()
    return out.to(values.dtype)


def target_activations(
    values: torch.Tensor, indices: torch.Tensor, neurons: Union[list[int], torch.Tensor]
) -> torch.Tensor:
    """z_j for each target latent j, float32 [..., |T|] (0 where j is not in the top k); `neurons` a
    list or a 1-D tensor of latent ids on indices' device."""
    tgt = neurons if isinstance(neurons, torch.Tensor) else torch.tensor(neurons, device=indices.device, dtype=indices.dtype)
    hit = indices.unsqueeze(-1) == tgt  # [..., k, T]
    return (values.float().unsqueeze(-1) * hit).sum(-2)


def target_thresholds(threshold: Any, neurons: Neurons, targets: list[int]) -> Union[float, torch.Tensor]:
    """The gate threshold as given (a float for every target) or per neuron: a sequence aligned with
    `neurons` as the caller gave them, returned as a float32 tensor [T] aligned with `targets`."""
    thr = target_threshold_values(threshold, neurons, targets)
    return thr if isinstance(thr, float) else torch.tensor(thr, dtype=torch.float32)


def target_threshold_values(threshold: Any, neurons: Neurons, targets: list[int]) -> Union[float, list[float]]:
    """`target_thresholds` as a float or a list of floats aligned with `targets`."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        thr: Union[float, list[float]] = float(threshold)
    else:
        try:
            thr = [float(t) for t in threshold]
        except (TypeError, ValueError):
            raise TypeError(f"threshold must be a float or a list of floats (one per neuron), got {threshold!r}") from None
    if not all(math.isfinite(t) for t in ([thr] if isinstance(thr, float) else thr)):
        raise ValueError(f"threshold {threshold!r} is not finite: a NaN threshold never fires, so the gate would "
                         "silently never edit")
    if isinstance(thr, float):
        return thr
    order = given_neurons(neurons)
    if len(thr) != len(order) or len(set(order)) != len(order):
        raise ValueError(f"threshold has {len(thr)} values for neurons {order}: expected one per (distinct) neuron")
    by = dict(zip(order, thr))
    return [by[j] for j in targets]


def gate_mask(
    z_t: torch.Tensor,
    count_mask: Optional[torch.Tensor],
    min_tokens: int,
    threshold: Union[float, torch.Tensor] = 0.0,
) -> torch.Tensor:
    """Per-prompt gate decision from target activations z_t [..., L, T]: bool [...]. `threshold`: a
    float, or a tensor [T] (one per target, see target_thresholds)."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(device=z_t.device, dtype=z_t.dtype)
    fired = (z_t > threshold).any(-1)  # [..., L]
    if count_mask is not None:
        fired = fired & count_mask
    return fired.sum(-1) >= min_tokens


def check_edit_call(x: torch.Tensor, sae: SAEWeights, neurons: Neurons, scale: float, clamp: Optional[float],
                    mode: str, gate: bool, min_tokens: int) -> list[int]:
    """The checks every edit implementation makes before computing; returns the sorted target latents."""
    targets = as_neuron_list(neurons, sae.W_enc.shape[1])
    check_edit_args(mode, scale, clamp)
    positive_int(min_tokens, "min_tokens")
    if gate and x.dim() < 2:
        raise ValueError(f"gate=True needs x shaped [..., L, d] (prompts of tokens), got {tuple(x.shape)}")
    return targets


def allowed_tokens(z_t: Optional[torch.Tensor], lead: torch.Size, device: torch.device, gate: bool, min_tokens: int,
                   threshold: Any, edit_mask: Optional[torch.Tensor], count_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[...] bool: the tokens an edit may change (edit_mask, then the gate's per-prompt decision)."""
    if edit_mask is None:
        allowed = torch.ones(lead, dtype=torch.bool, device=device)
    else:  # a view of the mask (the patch's is a stride-0 expand): no copy, no kernel
        allowed = torch.broadcast_to(edit_mask.to(torch.bool), lead)
    if gate:
        counted = allowed if count_mask is None else count_mask.to(torch.bool)
        allowed = allowed & gate_mask(z_t, counted, min_tokens, threshold).unsqueeze(-1)
    return allowed


def with_target_values(values: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor,
                       z_new: torch.Tensor) -> torch.Tensor:
    """`values` [..., k] with each target latent's entry replaced by its edited value z_new [..., T]."""
    hit = indices.unsqueeze(-1) == targets  # [..., k, T]
    return torch.where(hit.any(-1), (hit * z_new.unsqueeze(-2)).sum(-1), values)


def edit(
    x: torch.Tensor,
    sae: SAEWeights,
    neurons: Neurons,
    scale: float = 0.0,
    clamp: Optional[float] = None,
    mode: str = "residual",
    gate: bool = False,
    min_tokens: int = 1,
    edit_mask: Optional[torch.Tensor] = None,
    count_mask: Optional[torch.Tensor] = None,
    threshold: Union[float, Sequence[float]] = 0.0,
) -> torch.Tensor:
    """Suppress the target latents in x [..., d] (docs/method.md).

    - scale s: z_j <- s * z_j; clamp c: z_j <- min(z_j, c) (give one of them).
    - residual: x + sum_{j in T, z_j > 0} (z'_j - z_j) W_dec[j]; tokens on which no
      target fires are returned bit-identical.
    - reconstruct: the SAE output z' @ W_dec + b_dec replaces x.
    - edit_mask [...] bool: tokens allowed to change (the patch passes False for BOS).
    - gate: x is [..., L, d] (prompts of L tokens); a prompt is edited only if a target
      fires (value > threshold) on at least `min_tokens` tokens of `count_mask`
      (default: all tokens of edit_mask); `threshold` is one float or one per neuron (in `neurons` order).
    """
    targets = check_edit_call(x, sae, neurons, scale, clamp, mode, gate, min_tokens)
    thr = target_thresholds(threshold, neurons, targets)
    values, indices = encode(x, sae)
    values32 = pre_activations(x, sae).gather(-1, indices.long()).relu()  # unrounded z
    z_t = target_activations(values32, indices, targets)  # [..., T]
    z_new = z_t.clamp(max=clamp) if clamp is not None else z_t * scale

    allowed = allowed_tokens(z_t, x.shape[:-1], x.device, gate, min_tokens, thr, edit_mask, count_mask)

    if mode == "residual":
        fires = (z_t > 0).any(-1) & allowed
        w_t = decoder_rows(sae, targets).float()  # [T, d]
        # only targets with z_j > 0 move (a negative clamp must not touch silent targets)
        delta = torch.where(z_t > 0, z_new - z_t, torch.zeros_like(z_t)) @ w_t
        edited = (x.float() + delta).to(x.dtype)
        return torch.where(fires.unsqueeze(-1), edited, x)

    _need_full_decoder(sae, "mode='reconstruct'")
    tgt = torch.tensor(targets, device=indices.device, dtype=indices.dtype)
    new_vals = with_target_values(values32, indices, tgt, z_new)
    recon = decode(new_vals, indices, sae).to(x.dtype)  # new_vals is float32: decode accumulates in float32
    return torch.where(allowed.unsqueeze(-1), recon, x)

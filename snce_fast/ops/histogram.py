"""Streaming activation-frequency histograms (docs/method.md).

`update` adds one batch of SAE codes to per-group counters in place:
`prompts_fired[g, j]` (prompts where latent j fired on at least one counted token),
`tokens_fired[g, j]`, `act_sum[g, j]` (float64), `n_prompts[g]`, `n_tokens[g]`.
A latent fires on a token if it is in the token's top-k with value > threshold.

Three implementations of the same update: the `snce_fast::histogram_update` C++/CUDA op
(`update`), an eager torch one (`update_eager`, scatter_add_/bincount) and a plain NumPy
recount (`recount_numpy`) that the tests hold the others to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from snce_fast.ops import _ext

STATE_FIELDS = ("prompts_fired", "tokens_fired", "act_sum", "n_prompts", "n_tokens")

if _ext.load() is not None:

    @torch.library.register_fake("snce_fast::histogram_update")
    def _histogram_update_fake(
        indices, values, token_mask, prompt_of_token, group_of_prompt,
        prompts_fired, tokens_fired, act_sum, n_prompts, n_tokens, threshold=0.0,
    ):
        return None


@dataclass
class Histograms:
    """The counters of one scan: [G, n] per latent and [G] per group."""

    prompts_fired: torch.Tensor  # int64 [G, n]
    tokens_fired: torch.Tensor  # int64 [G, n]
    act_sum: torch.Tensor  # float64 [G, n]
    n_prompts: torch.Tensor  # int64 [G]
    n_tokens: torch.Tensor  # int64 [G]

    @classmethod
    def zeros(cls, n_groups: int, n_latents: int, device: torch.device | str = "cpu") -> "Histograms":
        z = lambda *shape, dt=torch.int64: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
        return cls(z(n_groups, n_latents), z(n_groups, n_latents), z(n_groups, n_latents, dt=torch.float64),
                   z(n_groups), z(n_groups))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in STATE_FIELDS}


def batch_layout(n_prompts: int, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """prompt_of_token for a [P, L] batch flattened to P * L tokens."""
    return torch.arange(n_prompts, device=device).repeat_interleave(seq_len)


def has_op(device: torch.device) -> bool:
    """Whether the compiled op can run on `device`."""
    if _ext.load() is None:
        return False
    if device.type == "cuda":
        return bool(_ext.built_with_cuda())
    return device.type == "cpu"


def update(
    indices: torch.Tensor,
    values: torch.Tensor,
    token_mask: torch.Tensor,
    prompt_of_token: torch.Tensor,
    group_of_prompt: torch.Tensor,
    state: Histograms,
    threshold: float = 0.0,
    backend: Optional[str] = None,
) -> None:
    """Add one batch to `state` in place. indices/values [M, k]; token_mask, prompt_of_token [M];
    group_of_prompt [P]. `backend`: None (the op when built, else eager), "op" or "eager"."""
    indices, values, token_mask, prompt_of_token, group_of_prompt = _normalise(
        indices, values, token_mask, prompt_of_token, group_of_prompt, state.act_sum.device
    )
    use_op = backend == "op" or (backend is None and has_op(indices.device))
    if backend not in (None, "op", "eager"):
        raise ValueError(f"backend={backend!r} is not a histogram backend: expected None, 'op' or 'eager'")
    if use_op:
        if not has_op(indices.device):
            raise RuntimeError(f"the histogram op is not built for {indices.device}: {_ext.load_error() or 'no CUDA build'}")
        torch.ops.snce_fast.histogram_update(
            indices, values, token_mask, prompt_of_token, group_of_prompt,
            state.prompts_fired, state.tokens_fired, state.act_sum, state.n_prompts, state.n_tokens,
            float(threshold),
        )
    else:
        update_eager(indices, values, token_mask, prompt_of_token, group_of_prompt, state, threshold)


def _normalise(indices, values, token_mask, prompt_of_token, group_of_prompt, device):
    if indices.dim() != 2 or values.shape != indices.shape:
        raise ValueError(
            f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must have one shape [M, k]"
        )
    return (
        indices.to(device=device, dtype=torch.int32),
        values.to(device),
        token_mask.to(device=device, dtype=torch.bool).reshape(-1),
        prompt_of_token.to(device=device, dtype=torch.int64).reshape(-1),
        group_of_prompt.to(device=device, dtype=torch.int64).reshape(-1),
    )


def update_eager(
    indices: torch.Tensor,
    values: torch.Tensor,
    token_mask: torch.Tensor,
    prompt_of_token: torch.Tensor,
    group_of_prompt: torch.Tensor,
    state: Histograms,
    threshold: float = 0.0,
) -> None:
    """The same update in eager torch (scatter_add_ / unique / bincount)."""
    G, n = state.prompts_fired.shape
    group_of_token = group_of_prompt[prompt_of_token]  # [M]
    state.n_prompts += torch.bincount(group_of_prompt, minlength=G)
    state.n_tokens += torch.bincount(group_of_token[token_mask], minlength=G)
    fires = (values.double() > threshold) & token_mask[:, None]  # [M, k]
    idx = indices.long()
    flat = (group_of_token[:, None] * n + idx)[fires]
    state.tokens_fired.view(-1).scatter_add_(0, flat, torch.ones_like(flat))
    state.act_sum.view(-1).scatter_add_(0, flat, values.double()[fires])
    pairs = torch.unique((prompt_of_token[:, None] * n + idx)[fires])  # one entry per (prompt, latent)
    rows = group_of_prompt[pairs // n] * n + pairs % n
    state.prompts_fired.view(-1).scatter_add_(0, rows, torch.ones_like(rows))


def recount_numpy(
    indices, values, token_mask, prompt_of_token, group_of_prompt, n_groups: int, n_latents: int,
    threshold: float = 0.0,
) -> dict[str, np.ndarray]:
    """A plain NumPy recount from scratch, prompt by prompt (for the exactness tests)."""
    as_np = lambda t: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)  # noqa: E731
    to_np64 = lambda t: t.double() if isinstance(t, torch.Tensor) else t  # noqa: E731  (numpy has no bf16)
    idx, val = as_np(indices).astype(np.int64), as_np(to_np64(values)).astype(np.float64)
    mask, pot, gop = as_np(token_mask).astype(bool), as_np(prompt_of_token).astype(np.int64), as_np(group_of_prompt)
    out = {
        "prompts_fired": np.zeros((n_groups, n_latents), np.int64),
        "tokens_fired": np.zeros((n_groups, n_latents), np.int64),
        "act_sum": np.zeros((n_groups, n_latents), np.float64),
        "n_prompts": np.zeros(n_groups, np.int64),
        "n_tokens": np.zeros(n_groups, np.int64),
    }
    for p, g in enumerate(gop):
        out["n_prompts"][g] += 1
        tokens = np.nonzero((pot == p) & mask)[0]
        out["n_tokens"][g] += len(tokens)
        seen: set[int] = set()
        for m in tokens:
            for j, v in zip(idx[m], val[m]):
                if v > threshold:
                    out["tokens_fired"][g, j] += 1
                    out["act_sum"][g, j] += v
                    seen.add(int(j))
        for j in seen:
            out["prompts_fired"][g, j] += 1
    return out


def itd_update(
    indices: torch.Tensor,
    values: torch.Tensor,
    token_mask: torch.Tensor,
    n_prompts: int,
    group_of_prompt: torch.Tensor,
    itd_prompts: torch.Tensor,
    top: int = 128,
    chunk_elements: int = 1 << 24,
) -> None:
    """ItD state: itd_prompts[g, j] += 1 for each prompt of group g whose top-`top` latents by
    max-over-counted-tokens activation (positive only) include j. indices/values [P * L, k]."""
    G, n = itd_prompts.shape
    dev = itd_prompts.device
    if n_prompts == 0:
        return
    L = indices.shape[0] // n_prompts
    idx = indices.to(dev).long().reshape(n_prompts, L * indices.shape[1])
    val = torch.where(token_mask.to(dev).reshape(n_prompts, L, 1), values.to(dev).float().reshape(n_prompts, L, -1), 0.0)
    val = val.reshape(n_prompts, -1).clamp_min(0.0)
    gop = group_of_prompt.to(dev).long()
    step = max(1, chunk_elements // n)
    for s in range(0, n_prompts, step):
        v, i = val[s : s + step], idx[s : s + step]
        dense = torch.zeros(v.shape[0], n, device=dev).scatter_reduce_(1, i, v, "amax")
        tv, ti = dense.topk(min(top, n), dim=1)
        keep = tv > 0
        rows = (gop[s : s + step, None] * n + ti)[keep]
        itd_prompts.view(-1).scatter_add_(0, rows, torch.ones_like(rows))

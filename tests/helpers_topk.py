"""Tie-aware comparison of a TopK encode against the eager reference (docs/method.md)."""
from __future__ import annotations

import torch

from snce_fast.ops import reference


def dyadic_inputs(M: int, d: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (x [M, d], W_enc [d, n], bias [n]) on small dyadic grids (x in -3..3, W in eighths of -1..1, bias in
    quarters of -2..2): every product and sum is exact in fp32, and in fp16 / bf16 tiles, so a kernel's tile order
    and numpy's agree bit for bit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (M, d), generator=g).float()
    W = torch.randint(-8, 9, (d, n), generator=g).float() / 8
    bias = torch.randint(-8, 9, (n,), generator=g).float() / 4
    return x, W, bias


def assert_topk_matches(x: torch.Tensor, sae, values: torch.Tensor, indices: torch.Tensor,
                        rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Check (values, indices) is a valid top-k of `reference.pre_activations(x, sae)`.

    The chosen set may differ from torch.topk's only by swaps among entries within
    `atol + rtol * |kth|` of the k-th value; values must equal ReLU(pre) at the chosen
    indices (to the dtype's rounding) and come sorted descending; indices are int32,
    unique and in range.
    """
    k, n = sae.k, sae.W_enc.shape[1]
    assert indices.dtype == torch.int32, indices.dtype
    assert values.dtype == x.dtype, (values.dtype, x.dtype)
    assert values.shape == indices.shape == (*x.shape[:-1], k), (values.shape, indices.shape, x.shape)
    if x.numel() == 0:
        return
    pre = reference.pre_activations(x, sae).reshape(-1, n)
    idx = indices.reshape(-1, k).long()
    vals = values.reshape(-1, k).float()
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert (idx.sort(-1).values.diff(dim=-1) != 0).all(), "duplicate indices in a row"
    bad = ~torch.isfinite(pre).all(-1)
    for r in bad.nonzero().flatten().tolist():
        _assert_nonfinite_row_matches(pre[r], idx[r], vals[r], k, x.dtype, rtol, atol)
    pre, idx, vals = pre[~bad], idx[~bad], vals[~bad]
    if pre.shape[0] == 0:
        return
    kth = pre.topk(k, dim=-1).values[:, -1:]
    tol = atol + rtol * kth.abs()
    chosen = pre.gather(-1, idx)
    assert (chosen >= kth - tol).all(), f"a chosen latent is below the k-th value: {(kth - chosen).max()}"
    others = pre.scatter(-1, idx, float("-inf"))
    assert (others <= kth + tol).all(), f"a dropped latent is above the k-th value: {(others - kth).max()}"
    eps = torch.finfo(x.dtype).eps
    expect = chosen.relu().to(x.dtype).float()
    torch.testing.assert_close(vals, expect, rtol=max(rtol, 2 * eps), atol=atol)
    assert (vals[:, :-1] >= vals[:, 1:]).all(), "values are not sorted descending"


def make_sae(d: int, n: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"):
    """A random SAE with non-zero biases (so the b_dec fold is exercised)."""
    import snce_fast

    g = torch.Generator().manual_seed(seed)
    sae = snce_fast.SAE(d, n, k, init=False)
    with torch.no_grad():
        sae.reset_parameters(generator=g)
        sae.b_enc.copy_(torch.randn(n, generator=g) * 0.05)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    return sae.to(device=device, dtype=dtype).requires_grad_(False)


def frequent_latents(x: torch.Tensor, sae, count: int = 2) -> list[int]:
    """The `count` latents active on most tokens of x under the reference encode: edit targets that fire."""
    _, idx = reference.encode(x, sae)
    return torch.bincount(idx.reshape(-1).long(), minlength=sae.W_enc.shape[1]).topk(count).indices.tolist()


def _assert_nonfinite_row_matches(pre: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, k: int,
                                  dtype: torch.dtype, rtol: float, atol: float) -> None:
    """A row whose pre-activations hold NaN or +-inf (docs/kernels.md, "NaN and inf"): NaN ranks above +inf
    as in torch.topk, so the chosen entries hold as many NaN as the reference's top k and the same other
    values (infinities exactly); values are ReLU(pre) at the indices (NaN stays NaN), NaN first, then descending."""
    want = pre.topk(k).values
    chosen = pre.gather(-1, idx)
    n_nan = int(want.isnan().sum())
    assert int(chosen.isnan().sum()) == n_nan, f"{int(chosen.isnan().sum())} NaN chosen, the reference has {n_nan}"
    got_rest = chosen[~chosen.isnan()].sort(descending=True).values
    torch.testing.assert_close(got_rest, want[~want.isnan()], rtol=rtol, atol=atol)
    torch.testing.assert_close(vals, chosen.relu().to(dtype).float(), rtol=max(rtol, 2 * torch.finfo(dtype).eps),
                               atol=atol, equal_nan=True)
    assert vals[:n_nan].isnan().all() and not vals[n_nan:].isnan().any(), f"NaN are not first: {vals.tolist()}"
    assert (vals[n_nan:-1] >= vals[n_nan + 1:]).all(), "values are not sorted descending"

"""snce_fast.train.topk_autograd: the sparse encoder/decoder gradients equal dense autograd, and a
training step's graph holds no dense matmul."""
from __future__ import annotations

import pytest
import torch

from helpers_train import new_sae, small_cfg, synthetic
from snce_fast.sae.model import SAE
from snce_fast.train import SAETrainer
from snce_fast.train.topk_autograd import sparse_decode, topk_encode


def _dense_loss(x, sae, k, dead, aux_k, aux_coef):
    """Dense autograd reference: z materialised [M, n], decoded with a dense matmul."""
    x_c = x - sae.b_dec
    pre = x_c @ sae.W_enc + sae.b_enc
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = z @ sae.W_dec + sae.b_dec
    tv = (x - x.mean(0)).pow(2).sum()
    loss = (x_hat - x).pow(2).sum() / tv
    aux = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1)
    za = torch.zeros_like(pre).scatter(1, aux.indices, aux.values.relu())
    e = (x - x_hat).detach()
    return loss + aux_coef * ((za @ sae.W_dec) - e).pow(2).sum() / e.pow(2).sum()


@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_gradients_equal_dense_autograd(sparse):
    torch.manual_seed(0)
    d, n, k, M, aux_k = 16, 64, 4, 40, 8
    sae = SAE(d, n, k)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(M, d)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    ref = _dense_loss(x, sae, k, dead, aux_k, 1 / 32)
    g_ref = torch.autograd.grad(ref, list(sae.parameters()))

    x_c = x - sae.b_dec
    vals, idx, av, ai = topk_encode(x_c, sae.W_enc, sae.b_enc, k, dead, aux_k, None, sparse)
    x_hat = sparse_decode(vals, idx, sae.W_dec) + sae.b_dec
    loss = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    e = (x - x_hat).detach()
    loss = loss + (1 / 32) * (sparse_decode(av, ai, sae.W_dec) - e).pow(2).sum() / e.pow(2).sum()
    g = torch.autograd.grad(loss, list(sae.parameters()))
    assert torch.allclose(loss, ref, rtol=1e-5)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], g, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    # the decoder gradient touches only latents that fired (main or aux)
    active = torch.zeros(n, dtype=torch.bool)
    active[torch.cat([idx[vals > 0], ai[av > 0]])] = True
    assert g[2][~active].abs().max() == 0


def test_no_dead_latents_gives_empty_aux_selection():
    sae = SAE(8, 16, 2)
    vals, idx, av, ai = topk_encode(torch.randn(5, 8), sae.W_enc, sae.b_enc, 2)
    assert vals.shape == idx.shape == (5, 2) and av.shape == ai.shape == (5, 0)
    assert torch.equal(sparse_decode(av, ai, sae.W_dec), torch.zeros(5, 8))


def test_no_dense_matmul_in_the_autograd_graph():
    """The training graph is the sparse encoder Function + embedding-bag decodes: no mm/addmm node."""
    cfg = small_cfg(dead_tokens=1)
    tr = SAETrainer(new_sae(32, cfg), cfg)
    tr.step(synthetic(64))  # makes latents dead so AuxK runs too
    seen: set[str] = set()
    orig = torch.Tensor.backward

    def spy(loss, *a, **kw):
        stack, visited = [loss.grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in visited:
                continue
            visited.add(id(fn))
            seen.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
        return orig(loss, *a, **kw)

    torch.Tensor.backward = spy
    try:
        m = tr.step(synthetic(64, seed=1))
    finally:
        torch.Tensor.backward = orig
    assert m["aux_loss"] > 0
    assert "EmbeddingBagBackward0" in seen and "_TopKEncodeBackward" in seen, seen
    assert not {"MmBackward0", "AddmmBackward0", "BmmBackward0"} & seen, seen

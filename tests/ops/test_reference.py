"""The eager reference against brute-force definitions of docs/method.md."""
import pytest
import torch

import snce_fast
from snce_fast.ops import reference
from snce_fast.testing import random_sae


def dense_z(values, indices, n):
    z = torch.zeros(*values.shape[:-1], n, dtype=torch.float32)
    return z.scatter(-1, indices.long(), values.float())


@pytest.fixture
def sae():
    return random_sae(d=24, n=50, k=5, seed=1)


def test_encode_is_topk_then_relu(sae):
    x = torch.randn(3, 7, 24)
    values, indices = reference.encode(x, sae)
    assert values.shape == indices.shape == (3, 7, 5)
    assert indices.dtype == torch.int32 and values.dtype == x.dtype
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = pre.sort(-1, descending=True)
    torch.testing.assert_close(values, expected.values[..., :5].clamp_min(0))
    assert torch.equal(indices.long(), expected.indices[..., :5])


def test_encode_drops_nonpositive_entries():
    sae = random_sae(d=8, n=10, k=10, seed=2)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    values, _ = reference.encode(torch.randn(4, 8), sae)
    assert torch.all(values == 0)


def test_encode_empty_batch_and_dtypes(sae):
    v, i = reference.encode(torch.empty(0, 24), sae)
    assert v.shape == (0, 5) and i.shape == (0, 5)
    for dt in (torch.float16, torch.bfloat16):
        v, _ = reference.encode(torch.randn(2, 24).to(dt), sae)
        assert v.dtype == dt


def test_encode_rejects_wrong_width(sae):
    with pytest.raises(ValueError, match="d_in=24"):
        reference.encode(torch.randn(2, 23), sae)


def test_decode_matches_dense_matmul(sae):
    x = torch.randn(6, 24)
    v, i = reference.encode(x, sae)
    expected = dense_z(v, i, sae.n_latents) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(reference.decode(v, i, sae), expected)


def fired_pair(sae, x):
    """A (token, latent) that fires and a latent that never fires on x."""
    v, i = reference.encode(x, sae)
    fired = dense_z(v, i, sae.n_latents) > 0
    counts = fired.reshape(-1, sae.n_latents).sum(0)
    silent = (counts == 0).nonzero()
    return int(counts.argmax()), (int(silent[0]) if len(silent) else None), fired


def test_residual_edit_leaves_non_firing_tokens_bit_identical(sae):
    x = torch.randn(40, 24)
    j, _, fired = fired_pair(sae, x)
    out = reference.edit(x, sae, j)
    untouched = ~fired[:, j]
    assert untouched.any() and (~untouched).any()
    assert torch.equal(out[untouched], x[untouched])
    assert not torch.equal(out[~untouched], x[~untouched])


def test_residual_edit_moves_only_along_the_decoder_row(sae):
    x = torch.randn(40, 24)
    j, _, fired = fired_pair(sae, x)
    z = dense_z(*reference.encode(x, sae), sae.n_latents)[:, j]
    for scale in (0.0, 0.5, -8.0):
        out = reference.edit(x, sae, [j], scale=scale)
        expected = x + ((scale - 1.0) * z)[:, None] * sae.W_dec[j]
        torch.testing.assert_close(out, expected)
    out = reference.edit(x, sae, j, clamp=0.1)
    expected = x + (z.clamp(max=0.1) - z)[:, None] * sae.W_dec[j]
    torch.testing.assert_close(out, expected)


def test_edit_of_a_latent_that_never_fires_is_identity(sae):
    x = torch.randn(4, 24)
    _, silent, _ = fired_pair(sae, x)
    assert silent is not None
    assert torch.equal(reference.edit(x, sae, silent), x)


def test_multi_neuron_residual_edit_sums_contributions(sae):
    x = torch.randn(40, 24)
    v, i = reference.encode(x, sae)
    z = dense_z(v, i, sae.n_latents)
    targets = z.gt(0).sum(0).topk(3).indices.tolist()
    out = reference.edit(x, sae, targets)
    expected = x - z[:, targets] @ sae.W_dec[targets]
    torch.testing.assert_close(out, expected)


def test_reconstruct_mode_replaces_x_by_edited_reconstruction(sae):
    x = torch.randn(30, 24)
    j, _, _ = fired_pair(sae, x)
    z = dense_z(*reference.encode(x, sae), sae.n_latents)
    z[:, j] *= 0.25
    expected = z @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(reference.edit(x, sae, j, scale=0.25, mode="reconstruct"), expected)


def test_edit_mask_protects_tokens(sae):
    x = torch.randn(2, 10, 24)
    j, _, _ = fired_pair(sae, x)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 0] = False
    out = reference.edit(x, sae, j, edit_mask=mask)
    assert torch.equal(out[:, 0], x[:, 0])
    torch.testing.assert_close(out[:, 1:], reference.edit(x[:, 1:], sae, j))


def test_gate_edits_only_prompts_with_enough_firing_tokens(sae):
    x = torch.randn(4, 12, 24)
    _, _, fired = fired_pair(sae, x)
    spread = fired.sum(1).amax(0) - fired.sum(1).amin(0)  # latents firing more on some prompts
    j = int(spread.argmax())
    per_prompt = fired[..., j].sum(-1)
    need = int(per_prompt.max())
    assert (per_prompt < need).any()
    out = reference.edit(x, sae, j, gate=True, min_tokens=need)
    ungated = reference.edit(x, sae, j)
    for p in range(4):
        if per_prompt[p] >= need:
            assert torch.equal(out[p], ungated[p])
        else:
            assert torch.equal(out[p], x[p])
    # a count mask that hides every firing token turns the gate off
    out = reference.edit(x, sae, j, gate=True, count_mask=~fired[..., j])
    assert torch.equal(out, x)


def test_gate_threshold(sae):
    x = torch.randn(3, 12, 24)
    j, _, _ = fired_pair(sae, x)
    assert torch.equal(reference.edit(x, sae, j, gate=True, threshold=1e9), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(neurons=50), "out of range"),
        (dict(neurons=-1), "out of range"),
        (dict(neurons=[]), "empty"),
        (dict(neurons="a"), "int"),
        (dict(neurons=1, mode="dense"), "mode='dense'"),
        (dict(neurons=1, scale=0.5, clamp=0.1), "either scale"),
        (dict(neurons=1, min_tokens=0), "min_tokens"),
    ],
)
def test_edit_rejects_bad_arguments(sae, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        reference.edit(torch.randn(2, 3, 24), sae, **kwargs)


def test_gate_needs_prompt_axis(sae):
    with pytest.raises(ValueError, match="gate=True"):
        reference.edit(torch.randn(24), sae, 1, gate=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_edit_keeps_dtype_and_untouched_tokens(sae, dtype):
    x = torch.randn(20, 24).to(dtype)
    j, _, fired = fired_pair(sae, x)
    out = reference.edit(x, sae, j)
    assert out.dtype == dtype
    assert torch.equal(out[~fired[:, j]], x[~fired[:, j]])


def test_sae_module_methods_match_reference(sae):
    x = torch.randn(5, 24)
    v, i = sae.encode(x)
    rv, ri = reference.encode(x, sae)
    assert torch.equal(i, ri) and torch.equal(v, rv)
    torch.testing.assert_close(sae.decode(v, i), reference.decode(v, i, sae))
    torch.testing.assert_close(sae.edit(x, [3, 7]), reference.edit(x, sae, [3, 7]))
    torch.testing.assert_close(sae(x), reference.decode(rv, ri, sae))


@pytest.mark.parametrize(
    "args, match",
    [((0, 10, 2), "d_in"), ((4, 10, 11), "k=11"), ((4, 10, 0), "k=0"), ((4, 10, 2, "layer:x"), "hook")],
)
def test_sae_constructor_validates(args, match):
    with pytest.raises(ValueError, match=match):
        snce_fast.SAE(*args)


def test_normalize_decoder_makes_rows_unit_norm(sae):
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.n_latents, 1) + 0.5)
    enc = sae.W_enc.detach().clone()
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents))
    assert torch.equal(sae.W_enc, enc)


def test_negative_clamp_moves_only_firing_targets(sae):
    x = torch.randn(40, 24)
    v, i = reference.encode(x, sae)
    z = dense_z(v, i, sae.n_latents)
    a, b = z.gt(0).sum(0).topk(2).indices.tolist()
    out = reference.edit(x, sae, [a, b], clamp=-0.5)
    coef = torch.where(z[:, [a, b]] > 0, z[:, [a, b]].clamp(max=-0.5) - z[:, [a, b]], torch.zeros(()))
    torch.testing.assert_close(out, x + coef @ sae.W_dec[[a, b]])

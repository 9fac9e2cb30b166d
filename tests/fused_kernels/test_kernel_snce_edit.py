"""Fused SNCE edit (snce_fast.kernels.edit) against snce_fast.reference.edit."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

triton = pytest.importorskip("triton")

from snce_fast import kernels  # noqa: E402
from snce_fast.ops import reference  # noqa: E402

from helpers_topk import make_sae  # noqa: E402

cpu_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests need TRITON_INTERPRET=1")


def _frequent(x, sae, count=1):
    """The latents that fire on the most tokens (so the edit touches some but not all)."""
    _, idx = reference.encode(x, sae)
    freq = torch.bincount(idx.reshape(-1).long(), minlength=sae.W_enc.shape[1])
    return freq.topk(count).indices.tolist()


def _check(x, sae, neurons, dtype_tol, **kw):
    out = kernels.edit(x, sae, neurons, **kw)
    ref = reference.edit(x, sae, neurons, **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=dtype_tol, atol=dtype_tol)
    untouched = (ref == x).all(-1)
    if kw.get("mode", "residual") == "residual":
        assert torch.equal(out[untouched], x[untouched]), "tokens where no target fires must be bit-identical"
    return out, ref, untouched


@cpu_only
@pytest.mark.parametrize(
    "shape,d,n,k,dtype",
    [((0,), 40, 300, 3, torch.float32), ((1,), 40, 300, 1, torch.float32), ((5,), 100, 1000, 17, torch.float32),
     ((77,), 48, 530, 3, torch.float16), ((2, 7), 72, 400, 17, torch.float16)],
)
def test_residual_scale_zero(shape, d, n, k, dtype):
    sae = make_sae(d, n, k, seed=d)
    x = torch.randn(*shape, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    neurons = _frequent(x, sae) if x.numel() else [0]
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    _, _, untouched = _check(x, sae, neurons, tol)
    if x.shape[:-1].numel() >= 5:
        assert (~untouched).any() and untouched.any()  # the test exercises both paths


@cpu_only
@pytest.mark.parametrize("kw", [dict(scale=-8.0), dict(clamp=0.05), dict(scale=0.5), dict(mode="reconstruct"),
                                dict(mode="reconstruct", clamp=0.0), dict(clamp=-0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rules_and_modes_multi_neuron(kw, dtype):
    sae = make_sae(40, 260, 5, seed=1)
    x = torch.randn(3, 9, 40, generator=torch.Generator().manual_seed(4)).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    _check(x, sae, _frequent(x, sae, 3), tol, **kw)


@cpu_only
@pytest.mark.parametrize("mode", ["residual", "reconstruct"])
def test_gate_masks_and_min_tokens(mode):
    sae = make_sae(32, 200, 6, seed=2)
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(5))
    neurons = _frequent(x, sae)
    edit_mask = torch.ones(4, 8, dtype=torch.bool)
    edit_mask[:, 0] = False  # BOS
    count_mask = edit_mask.clone()
    count_mask[:, 6:] = False  # padding not counted
    for min_tokens in (1, 2, 4):
        for threshold in (0.0, 0.3):
            _check(x, sae, neurons, 1e-5, mode=mode, gate=True, min_tokens=min_tokens, edit_mask=edit_mask,
                   count_mask=count_mask, threshold=threshold)
    out = kernels.edit(x, sae, neurons, mode=mode, edit_mask=edit_mask)
    assert torch.equal(out[:, 0], x[:, 0])  # BOS never edited


@cpu_only
def test_validation_matches_reference():
    sae = make_sae(16, 64, 4)
    x = torch.randn(2, 3, 16)
    bad = [dict(neurons=[]), dict(neurons=[64]), dict(neurons=1, mode="bogus"), dict(neurons=1, scale=1.0, clamp=0.1),
           dict(neurons=1, min_tokens=0)]
    for kw in bad:
        with pytest.raises((ValueError, TypeError)):
            reference.edit(x, sae, **kw)
        with pytest.raises((ValueError, TypeError)):
            kernels.edit(x, sae, **kw)
    with pytest.raises(ValueError):
        kernels.edit(torch.randn(16), sae, 1, gate=True)


@cpu_only
def test_backend_and_sae_method(monkeypatch):
    monkeypatch.setenv("SNCE_FAST_BACKEND", "triton")
    sae = make_sae(24, 96, 4)
    x = torch.randn(2, 5, 24)
    j = _frequent(x, sae)
    torch.testing.assert_close(sae.edit(x, j, scale=0.0), reference.edit(x, sae, j), rtol=1e-5, atol=1e-5)


@cpu_only
def test_duck_typed_holder():
    sae = make_sae(24, 96, 4)

    class Holder:
        W_enc, b_enc, W_dec, b_dec, k = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.k

    x = torch.randn(6, 24)
    _check(x, Holder(), _frequent(x, sae), 1e-5)


@cpu_only
def test_opcheck_and_compile():
    sae = make_sae(24, 96, 4)
    x = torch.randn(6, 24)
    v, i = kernels.encode(x, sae)
    tgt = torch.tensor([int(i[0, 0])], dtype=torch.int32)
    args = (x, v.float(), i, tgt, sae.W_dec[tgt.long()].float().contiguous(), torch.ones(6, dtype=torch.int8), 0.0,
            False, 0.0)
    torch.library.opcheck(torch.ops.snce_fast.triton_edit_residual.default, args)
    f = torch.compile(lambda *a: torch.ops.snce_fast.triton_edit_residual(*a) * 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(f(*args), torch.ops.snce_fast.triton_edit_residual(*args))
    keys = kernels.candidate_keys(x, sae.W_enc.detach(), kernels.folded_bias(sae), sae.k)
    mask = (torch.arange(3) >= 1).expand(2, 3)
    for allowed in (None, mask):
        kargs = (x, keys, sae.k, tgt, args[4], allowed, 0.0, False, 0.0)
        torch.library.opcheck(torch.ops.snce_fast.triton_edit_residual_keys.default, kargs)
        want = torch.ops.snce_fast.triton_edit_residual(*args[:5], torch.ones(6, dtype=torch.int8) if allowed is None
                                                        else mask.reshape(-1).to(torch.int8), *args[6:])
        assert torch.equal(torch.ops.snce_fast.triton_edit_residual_keys(*kargs), want)


@cpu_only
@pytest.mark.parametrize("slim", [False, True])
def test_repeat_calls_make_no_tensors_from_python_values(monkeypatch, slim):
    """Target ids, per-neuron thresholds and the fp32 decoder rows are made once: on a GPU each
    torch.tensor(list) would be a host-to-device copy per encoder call (and is not allowed while a
    CUDA graph is captured)."""
    sae = make_sae(24, 96, 4)
    x = torch.randn(3, 6, 24, generator=torch.Generator().manual_seed(1))
    neurons = _frequent(x, sae, 2)
    holder = sae.slim(neurons) if slim else sae
    kw = dict(gate=True, min_tokens=1, threshold=[0.01, 0.02], edit_mask=torch.ones(3, 6, dtype=torch.bool))
    first = kernels.edit(x, holder, neurons, **kw)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    again = kernels.edit(x, holder, neurons, **kw)
    monkeypatch.setattr(torch, "tensor", real)
    assert made == []
    assert torch.equal(again, first)
    torch.testing.assert_close(first, reference.edit(x, sae, neurons, **kw), rtol=1e-5, atol=1e-5)


@cpu_only
def test_cached_decoder_rows_follow_weight_updates():
    sae = make_sae(24, 96, 4)
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
    neurons = _frequent(x, sae, 2)
    _check(x, sae, neurons, 1e-5, scale=0.5)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)  # an in-place update (optimizer step) bumps the version: rows are gathered again
    _check(x, sae, neurons, 1e-5, scale=0.5)
    other = make_sae(24, 96, 4, seed=9)  # another SAE: its own rows, whatever its addresses
    _check(x, other, neurons, 1e-5, scale=0.5)


@pytest.mark.gpu
def test_gpu_edit_in_a_cuda_graph():
    """After one warm-up call, the fused edit captures into a CUDA graph and replays on new inputs."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    sae = make_sae(768, 32768, 64, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(2, 77, 768, device="cuda", dtype=torch.bfloat16)
    neurons = _frequent(x, sae, 2)
    kw = dict(gate=True, threshold=[0.0, 0.1], edit_mask=torch.ones(2, 77, dtype=torch.bool, device="cuda"))
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.edit(static_x, sae, neurons, **kw)  # warm-up: compiles, caches the constants
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernels.edit(static_x, sae, neurons, **kw)
    new = torch.randn_like(x)
    static_x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out.float(), reference.edit(new, sae, neurons, **kw).float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("d,n,k", [(768, 32768, 64), (1024, 32768, 32), (1280, 32768, 64)])
@pytest.mark.parametrize("prompts", [1, 64, 256])
def test_gpu_edit_real_shapes(d, n, k, prompts):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    sae = make_sae(d, n, k, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(prompts, 77, d, device="cuda", dtype=torch.bfloat16)
    neurons = _frequent(x, sae)
    edit_mask = torch.ones(prompts, 77, dtype=torch.bool, device="cuda")
    edit_mask[:, 0] = False
    _check(x, sae, neurons, 3e-2, edit_mask=edit_mask)
    _check(x, sae, neurons, 3e-2, gate=True, min_tokens=2, edit_mask=edit_mask)

"""Sparse decode kernel (snce_fast.kernels.decode) against the eager reference."""
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


def _sparse(M, n, k, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(M)]) if M else torch.zeros(0, k, dtype=torch.long)
    vals = torch.rand(M, k, generator=g) * 3
    return vals.to(device=device, dtype=dtype), idx.to(device=device, dtype=torch.int32)


@cpu_only
@pytest.mark.parametrize(
    "M,d,n,k,dtype",
    [(0, 40, 300, 3, torch.float32), (1, 40, 300, 1, torch.float32), (5, 100, 1000, 17, torch.float32),
     (77, 72, 700, 3, torch.float16), (6, 300, 500, 33, torch.float16)],
)
def test_decode_matches_reference(M, d, n, k, dtype):
    sae = make_sae(d, n, k)
    vals, idx = _sparse(M, n, k, dtype, seed=M)
    out = kernels.decode(vals, idx, sae)
    ref = reference.decode(vals, idx, sae)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@cpu_only
def test_decode_leading_shape_int64_indices_and_mixed_dtype():
    sae = make_sae(24, 100, 4)
    vals, idx = _sparse(6, 100, 4, torch.float16)
    vals, idx = vals.reshape(2, 3, 4), idx.reshape(2, 3, 4).long()
    torch.testing.assert_close(kernels.decode(vals, idx, sae), reference.decode(vals, idx, sae), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError):
        kernels.decode(vals, idx[..., :3], sae)


@cpu_only
def test_decode_with_a_column_strided_decoder():
    """A tied decoder stored as W_enc.T has column stride n, not 1."""
    sae = make_sae(24, 90, 5)
    with torch.no_grad():
        sae.W_dec = torch.nn.Parameter(sae.W_enc.detach().clone().T)  # [n, d] view with strides (1, n)
    assert sae.W_dec.stride(1) != 1
    vals, idx = _sparse(7, 90, 5, torch.float32, seed=3)
    torch.testing.assert_close(kernels.decode(vals, idx, sae), reference.decode(vals, idx, sae), rtol=1e-5, atol=1e-5)


@cpu_only
def test_decode_roundtrip_with_encode():
    sae = make_sae(32, 200, 8)
    x = torch.randn(7, 32)
    torch.testing.assert_close(kernels.decode(*kernels.encode(x, sae), sae), reference.decode(*reference.encode(x, sae), sae),
                               rtol=1e-4, atol=1e-4)


@cpu_only
def test_opcheck_and_compile():
    sae = make_sae(24, 100, 4)
    vals, idx = _sparse(5, 100, 4, torch.float32)
    args = (vals, idx, sae.W_dec.detach(), sae.b_dec.detach())
    torch.library.opcheck(torch.ops.snce_fast.triton_sparse_decode.default, args)
    f = torch.compile(lambda *a: torch.ops.snce_fast.triton_sparse_decode(*a) + 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(*args), torch.ops.snce_fast.triton_sparse_decode(*args) + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("d,n,k", [(768, 32768, 64), (1280, 32768, 32), (1024, 524288, 64)])
def test_gpu_decode_real_shapes(d, n, k):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    sae = make_sae(d, n, k, dtype=torch.bfloat16, device="cuda")
    vals, idx = _sparse(16 * 77, n, k, torch.bfloat16, device="cuda")
    torch.testing.assert_close(kernels.decode(vals, idx, sae), reference.decode(vals, idx, sae), rtol=2e-2, atol=2e-2)

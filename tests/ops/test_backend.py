"""Backend dispatch and the C++ extension's CPU ops against the reference."""
import pytest
import torch

import snce_fast
from snce_fast.ops import _ext, backend, reference
from snce_fast.testing import random_sae


def test_extension_is_built():
    """The install builds snce_fast._C; if this fails the build silently fell back."""
    assert _ext.load() is not None, _ext.load_error()
    assert _ext.built_with_cuda() == torch.cuda.is_available() or not torch.cuda.is_available()


def test_forced_backends(monkeypatch):
    monkeypatch.setenv("SNCE_FAST_BACKEND", "reference")
    assert backend.implementation("decode", torch.device("cpu"))[0] == "reference"
    monkeypatch.setenv("SNCE_FAST_BACKEND", "cpp")
    assert backend.implementation("decode", torch.device("cpu"))[0] == "cpp"
    assert backend.implementation("encode", torch.device("cpu"))[0] == "reference"  # no C++ encode: reference
    monkeypatch.setenv("SNCE_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SNCE_FAST_BACKEND='cuda'"):
        backend.implementation("decode", torch.device("cpu"))


def test_auto_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("SNCE_FAST_BACKEND", raising=False)
    assert backend.implementation("decode", torch.device("cpu"))[0] == "cpp"
    assert backend.implementation("edit", torch.device("cpu"))[0] == "reference"


@pytest.mark.parametrize("cuda_build", [True, False])
def test_cuda_without_triton_decodes_with_the_cuda_extension_when_built(monkeypatch, cuda_build):
    """csrc/sparse_decode_cuda.cu serves CUDA tensors when Triton is unavailable; encode/edit have no
    C++ kernel and use the reference. (Dispatch only: nothing runs on a CUDA device here.)"""
    monkeypatch.delenv("SNCE_FAST_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_triton_ops", lambda: (None, "no triton here"))
    monkeypatch.setattr(backend, "_cpp_has_cuda", lambda: cuda_build)
    cuda = torch.device("cuda")
    assert backend.implementation("decode", cuda)[0] == ("cpp" if cuda_build else "reference")
    assert backend.implementation("encode", cuda)[0] == "reference"
    assert backend.implementation("edit", cuda)[0] == "reference"


def test_triton_forced_without_kernels_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SNCE_FAST_BACKEND", "triton")
    monkeypatch.setattr(backend, "_triton_ops", lambda: (None, "no triton here"))
    with pytest.raises(RuntimeError, match="no triton here"):
        backend.implementation("encode", torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5)])
def test_cpp_sparse_decode_matches_reference(dtype, shape):
    sae = random_sae(20, 70, 7, seed=2).to(dtype)
    x = torch.randn(*shape, 20).to(dtype)
    v, i = reference.encode(x, sae)
    from snce_fast.ops import cpp_ops

    out = cpp_ops.decode(v, i, sae)
    assert out.shape == (*shape, 20) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, reference.decode(v, i, sae), **tol)


def test_cpp_sparse_decode_rejects_bad_indices():
    sae = random_sae(4, 10, 2)
    v = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="indices must lie in"):
        torch.ops.snce_fast.sparse_decode(v, torch.full((3, 2), 10, dtype=torch.int32), sae.W_dec, sae.b_dec)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.snce_fast.sparse_decode(v, torch.zeros(3, 2, dtype=torch.int64), sae.W_dec, sae.b_dec)


def test_sparse_decode_opcheck():
    sae = random_sae(8, 16, 3)
    v, i = reference.encode(torch.randn(5, 8), sae)
    torch.library.opcheck(torch.ops.snce_fast.sparse_decode.default, (v, i, sae.W_dec.detach(), sae.b_dec.detach()))


def test_info_reports_backends():
    from snce_fast.info import report

    text = report()
    assert "C++ extension: built" in text and "on cpu:" in text


def test_version():
    assert snce_fast.__version__


def test_cpp_sparse_decode_gradients_match_reference():
    sae = random_sae(6, 12, 3, seed=4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    v, i = reference.encode(x, sae)
    v = v.detach().requires_grad_()
    from snce_fast.ops import cpp_ops

    args = (v, i, sae.W_dec, sae.b_dec)
    torch.autograd.gradcheck(lambda a, w, b: cpp_ops.decode(a, i, _W(w, b)), (v, sae.W_dec, sae.b_dec))
    grads = torch.autograd.grad(cpp_ops.decode(*args[:2], sae).sum(), (v, sae.W_dec, sae.b_dec))
    ref = torch.autograd.grad(reference.decode(*args[:2], sae).sum(), (v, sae.W_dec, sae.b_dec))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


class _W:
    def __init__(self, W_dec, b_dec):
        self.W_dec, self.b_dec = W_dec, b_dec


def test_missing_extension_falls_back_with_a_clear_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "snce_fast._C", None)  # makes `from . import _C` raise ImportError
    _ext.load.cache_clear()
    try:
        assert _ext.load() is None
        assert "pip install --no-build-isolation -e ." in _ext.load_error()
        monkeypatch.delenv("SNCE_FAST_BACKEND", raising=False)
        assert backend.implementation("decode", torch.device("cpu"))[0] == "reference"
        monkeypatch.setenv("SNCE_FAST_BACKEND", "cpp")
        with pytest.raises(RuntimeError, match="C\\+\\+ extension is unavailable"):
            backend.implementation("decode", torch.device("cpu"))
    finally:
        _ext.load.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cpp_sparse_decode_matches_reference(dtype):
    """The CUDA build of the C++ op (csrc/sparse_decode_cuda.cu) against the reference."""
    if not _ext.built_with_cuda():
        pytest.skip("extension built without CUDA")
    sae = random_sae(768, 4096, 64, seed=4).to(device="cuda", dtype=dtype)
    x = torch.randn(3, 77, 768, device="cuda").to(dtype)
    v, i = reference.encode(x, sae)
    out = torch.ops.snce_fast.sparse_decode(v.reshape(-1, 64), i.reshape(-1, 64).int(), sae.W_dec, sae.b_dec)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.reshape(x.shape), reference.decode(v, i, sae), **tol)


@pytest.mark.gpu
def test_gpu_cpp_sparse_decode_out_of_range_index_asserts():
    """An index >= n_latents trips a device-side assert (run in a subprocess: it poisons the CUDA context)."""
    import subprocess
    import sys

    if not _ext.built_with_cuda():
        pytest.skip("extension built without CUDA")
    code = (
        "import torch, snce_fast\n"
        "W = torch.randn(16, 8, device='cuda'); b = torch.zeros(8, device='cuda')\n"
        "v = torch.ones(2, 3, device='cuda'); i = torch.full((2, 3), 16, dtype=torch.int32, device='cuda')\n"
        "torch.ops.snce_fast.sparse_decode(v, i, W, b); torch.cuda.synchronize()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "assert" in (out.stderr + out.stdout).lower(), out.stderr[-2000:]

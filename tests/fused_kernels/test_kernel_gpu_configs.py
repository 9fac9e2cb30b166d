"""The kernels with the launch configurations a GPU gets, run through the (bounds-checked) interpreter.

Under TRITON_INTERPRET=1 the dispatcher picks interpreter-friendly blocks (one large tile, one
k-block, no latent splits worth the name), so the masking, k-block loops, d-block loops and
split merges that a GPU launch takes would otherwise only ever run on a GPU. Here the GPU's
choices are forced (the hopper table, a 132-SM split plan, the GPU edit/decode blocks) on small,
awkward shapes, and every load and store is bounds-checked (tests/interpreter_bounds.py).
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

pytest.importorskip("triton")

from snce_fast import kernels  # noqa: E402
from snce_fast.ops import reference  # noqa: E402
from snce_fast.kernels._tuning import encode_candidates, next_pow2, split_plan  # noqa: E402

from helpers_topk import assert_topk_matches, frequent_latents, make_sae  # noqa: E402

encode_mod = importlib.import_module("snce_fast.kernels.encode_topk")
edit_mod = importlib.import_module("snce_fast.kernels.snce_edit")
decode_mod = importlib.import_module("snce_fast.kernels.sparse_decode")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
H100_SMS = 132


def _gpu_encode_launches(monkeypatch, pick=0, record=None):
    """Make encode use the hopper table's `pick`-th candidate and the split plan of a 132-SM GPU."""
    def config(M, n, d, KP, dtype, device):
        cands = encode_candidates(M, KP, "hopper", torch.empty((), dtype=dtype).element_size())
        cfg = cands[min(pick, len(cands) - 1)]
        if record is not None:
            record.append(cfg)
        return cfg

    monkeypatch.setattr(encode_mod, "encode_config", config)
    monkeypatch.setattr(encode_mod, "encode_splits", lambda M, n, KP, cfg, device: split_plan(M, n, cfg, H100_SMS))
    monkeypatch.setattr(encode_mod, "interpreting", lambda: False)  # the merge kernel's GPU blocks (BS <= 2048)


@pytest.mark.parametrize(
    "M,d,n,k,dtype",
    [
        (1, 100, 1300, 64, torch.float16),   # the default benchmark shape class: BM 32, 2 k-blocks, 2 splits
        (5, 100, 1300, 17, torch.float32),   # fp32 table (BK 32: 4 k-blocks, the last partial)
        (77, 40, 700, 3, torch.float16),     # one prompt of tokens: BM 128 allowed, one split
        (3, 72, 1300, 1, torch.float32),     # KP 1: no merge buffer
        (2, 24, 1100, 200, torch.float16),   # KP 256: BN 256, the smallest tile
        (9, 40, 600, 3, torch.float16),      # fp16 x with an fp32 SAE: the fp32 table
    ],
)
def test_encode_with_gpu_default_configs(monkeypatch, M, d, n, k, dtype):
    seen = []
    _gpu_encode_launches(monkeypatch, record=seen)
    sae_dtype = torch.float32 if (M, d) == (9, 40) else dtype
    sae = make_sae(d, n, k, seed=M + k).to(sae_dtype)
    x = (torch.randn(M, d, generator=torch.Generator().manual_seed(k)) * 2).to(dtype)
    values, indices = kernels.encode(x, sae)
    tol = 1e-4 if dtype == torch.float32 and sae_dtype == torch.float32 else 3e-3
    assert_topk_matches(x, sae, values, indices, rtol=tol, atol=tol)
    cfg = seen[0]
    assert cfg.BN >= 128 and cfg.BM >= 16 and cfg.FEW == 8  # really a GPU config, not the interpreter's


@pytest.mark.parametrize("M,d,n,k,dtype", [(1, 100, 1300, 64, torch.float16), (5, 100, 1300, 17, torch.float32),
                                             (2, 24, 1100, 200, torch.float16), (3, 72, 1300, 1, torch.float32)])
def test_compact_select_with_gpu_default_configs(monkeypatch, M, d, n, k, dtype):
    """The "compact" selection path with the hopper tiles and split plan (buffers of next_pow2(KP + BN))."""
    _gpu_encode_launches(monkeypatch)
    monkeypatch.setattr(encode_mod, "SELECT", "compact")
    sae = make_sae(d, n, k, seed=M + k).to(dtype)
    x = (torch.randn(M, d, generator=torch.Generator().manual_seed(k)) * 2).to(dtype)
    values, indices = kernels.encode(x, sae)
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    assert_topk_matches(x, sae, values, indices, rtol=tol, atol=tol)


def test_encode_with_every_hopper_candidate(monkeypatch):
    """Every config `tune` may pick, at the bf16-like (2-byte) table and k 64."""
    M, d, n, k = 40, 72, 1300, 33
    n_cands = len(encode_candidates(M, next_pow2(k), "hopper", 2))
    assert n_cands > 1
    sae = make_sae(d, n, k, seed=7).half()
    x = torch.randn(M, d, generator=torch.Generator().manual_seed(8)).half()
    for pick in range(n_cands):
        seen = []
        _gpu_encode_launches(monkeypatch, pick, seen)
        values, indices = kernels.encode(x, sae)
        assert_topk_matches(x, sae, values, indices, rtol=3e-3, atol=3e-3)
        assert seen[0] == encode_candidates(M, next_pow2(k), "hopper", 2)[pick]


@pytest.mark.parametrize("shape,d,n,k", [((1, 7), 40, 700, 3), ((2, 5), 1100, 400, 17)])  # d 1100: two 1024-wide d-blocks
def test_edit_with_gpu_blocks(monkeypatch, shape, d, n, k):
    _gpu_encode_launches(monkeypatch)
    monkeypatch.setattr(edit_mod, "interpreting", lambda: False)
    assert edit_mod.edit_blocks(k, 2, d, False)["num_warps"] == 4
    sae = make_sae(d, n, k, seed=d)
    x = torch.randn(*shape, d, generator=torch.Generator().manual_seed(2))
    neurons = frequent_latents(x, sae)
    for kw in (dict(), dict(clamp=0.05), dict(scale=0.5)):
        out = kernels.edit(x, sae, neurons, **kw)
        ref = reference.edit(x, sae, neurons, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        untouched = (ref == x).all(-1)
        assert untouched.any() and (~untouched).any()
        assert torch.equal(out[untouched], x[untouched])


@pytest.mark.parametrize("M,d,n,k", [(1, 40, 300, 1), (5, 700, 900, 64), (3, 513, 600, 100), (4, 24, 200, 33)])
def test_decode_with_gpu_blocks(monkeypatch, M, d, n, k):
    """GPU decode blocks: k in blocks of 32 (k 64 / 100 loop), d in blocks of 512 (d 700 / 513 loop)."""
    monkeypatch.setattr(decode_mod, "interpreting", lambda: False)
    blocks = decode_mod.decode_blocks(k, d, decode_mod.interpreting())
    assert blocks["BK"] == min(next_pow2(k), 32) and blocks["BD"] == min(next_pow2(d), 512)
    sae = make_sae(d, n, k, seed=k)
    g = torch.Generator().manual_seed(M)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(M)]).to(torch.int32)
    vals = torch.rand(M, k, generator=g) * 3
    torch.testing.assert_close(kernels.decode(vals, idx, sae), reference.decode(vals, idx, sae), rtol=1e-5, atol=1e-5)

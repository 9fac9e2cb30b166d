"""Fused encode + TopK (snce_fast.kernels.encode_topk) against the eager reference."""
import importlib
import os
from collections import OrderedDict

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from snce_fast import kernels  # noqa: E402
from snce_fast.ops import reference  # noqa: E402

from helpers_topk import assert_topk_matches, make_sae  # noqa: E402

encode_mod = importlib.import_module("snce_fast.kernels.encode_topk")  # the module; the package's `encode_topk` is the op

CPU_OK = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(not CPU_OK, reason="CPU tests need TRITON_INTERPRET=1")


def _encode_matches_reference(M, d, n, k, dtype):
    """kernels.encode of a seeded SAE and x (scaled by 2) against the reference top-k."""
    sae = make_sae(d, n, k, seed=M + d)
    x = (torch.randn(M, d, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    values, indices = kernels.encode(x, sae)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert_topk_matches(x, sae, values, indices, rtol=tol, atol=tol)


@cpu_only
@pytest.mark.parametrize(
    "M,d,n,k,dtype",
    [
        (0, 40, 300, 3, torch.float32),
        (1, 40, 300, 1, torch.float32),
        (5, 100, 1000, 17, torch.float32),
        (5, 72, 700, 3, torch.float16),
        (77, 64, 2048, 3, torch.float32),
        (77, 48, 530, 17, torch.float16),
        (3, 33, 97, 17, torch.float32),  # n barely above k: some splits keep fewer than k
    ],
)
def test_encode_matches_reference(M, d, n, k, dtype):
    _encode_matches_reference(M, d, n, k, dtype)


@cpu_only
def test_single_split_with_insertions_is_sorted():
    """Many row blocks make one latent split (splits * KP == k): rows that took one-at-a-time insertions
    after the last bitonic merge hold their keys unordered, and the result must still come out sorted."""
    M, d, n, k = 520, 24, 320, 8
    cfg = encode_mod.encode_config(M, n, d, k, torch.float32, torch.device("cpu"))
    splits, chunk = encode_mod.encode_splits(M, n, k, cfg, torch.device("cpu"))
    assert splits == 1 and n > cfg.BN  # the case under test
    sae = make_sae(d, n, k, seed=11)
    x = torch.randn(M, d, generator=torch.Generator().manual_seed(5))
    keys = x.new_empty((M, k), dtype=torch.int64)
    encode_mod._launch(x, sae.W_enc.detach(), encode_mod.folded_bias(sae), keys, cfg, k, splits, chunk)
    assert (keys[:, 1:] > keys[:, :-1]).any()  # some row's raw keys really are out of order
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=1e-4, atol=1e-4)


@cpu_only
def test_int64_offset_path_matches_reference(monkeypatch):
    """The WIDE (int64 element offsets) variant used for SAEs with >= 2**31 weights, forced on small shapes."""
    monkeypatch.setattr(encode_mod, "_FORCE_WIDE", True)
    sae = make_sae(40, 300, 17, seed=3)
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(2))
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=1e-4, atol=1e-4)


def test_wide_offsets_decided_from_strides():
    _needs_wide = encode_mod._needs_wide

    assert not _needs_wide(torch.empty(3, 4), torch.empty(0, 5))
    # rows 2**31 elements apart (a meta tensor: no memory behind it)
    big = torch.empty_strided((2, 1), (2**31, 1), device="meta")
    assert _needs_wide(big)


@cpu_only
def test_encode_leading_shape_noncontiguous_and_mixed_dtype():
    sae = make_sae(40, 260, 5)
    x = torch.randn(2, 3, 80)[..., ::2].half()  # non-contiguous, fp16 x with an fp32 SAE
    values, indices = kernels.encode(x, sae)
    assert values.shape == (2, 3, 5) and values.dtype == torch.float16
    assert_topk_matches(x, sae, values, indices, rtol=2e-3, atol=2e-3)


@cpu_only
def test_relu_and_ties():
    sae = make_sae(16, 128, 8)
    with torch.no_grad():
        sae.b_enc.fill_(-5.0)  # every pre-activation negative: all values 0
    x = torch.zeros(3, 16)
    values, indices = kernels.encode(x, sae)
    assert (values == 0).all()
    assert_topk_matches(x, sae, values, indices)


@triton.jit
def _key_round_trip_kernel(v_ptr, key_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    key = encode_mod._pack(tl.load(v_ptr + offs), offs)
    tl.store(key_ptr + offs, key)
    tl.store(out_ptr + offs, encode_mod._key_value(key))


@cpu_only
def test_key_round_trip():
    """The threshold a row filters by is `_key_value` of its KP-th key: it must give back the packed value.
    It read -inf for every value <= -2.0 (the sentinel test `key < -2**62` caught their keys), so a row of
    such values took every later tile as all candidates (the slow path); NaN keys rank above +inf."""
    v = torch.tensor([-3.0, -2.0, -1.99, -1e30, float("-inf"), -0.5, 0.0, 2.5, 1e30, float("inf"),
                      float("nan"), -float("nan"), 7.0, -7.0, 3.0, -2.5])
    keys = torch.empty(16, dtype=torch.int64)
    out = torch.empty(16)
    _key_round_trip_kernel[(1,)](v, keys, out, N=16)
    finite = ~v.isnan()
    assert torch.equal(out[finite], v[finite]), (v[finite], out[finite])
    assert out[~finite].isnan().all()
    order = keys[finite].argsort()
    assert (v[finite][order].diff() >= 0).all(), "keys do not order like the values"
    assert (keys[~finite] > keys[v == float("inf")]).all(), "NaN (either sign) must rank above +inf"


def _nonfinite_case(dtype):
    """Rows of pre-activations with NaN and +-inf, as fp16 overflow makes them (docs/kernels.md, NaN and inf)."""
    d, n, k = 40, 300, 17
    sae = make_sae(d, n, k, seed=4)
    with torch.no_grad():  # latent rows where x[0] = inf gives -inf except at three latents (+inf)
        sae.W_enc[0].copy_(-sae.W_enc[0].abs())
        sae.W_enc[0, [5, 77, 200]] = 1.0
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(3))
    x[1, 3] = float("nan")  # every pre-activation NaN
    x[2, 1] = float("inf")  # +-inf by the sign of W_enc[1]
    x[3, 1], x[3, 2] = float("inf"), float("-inf")  # NaN where W_enc[1] and W_enc[2] agree in sign, else +-inf
    x[4, 0] = float("inf")  # fewer than k values above -inf: 3 x +inf, then -inf
    return sae, x.to(dtype)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_and_inf_rows_match_reference(dtype):
    """NaN pre-activations were never candidates (torch.topk ranks them first), and a row with fewer than k
    values above -inf kept sentinel slots, decoded as indices 0..KP-1 with NaN values."""
    sae, x = _nonfinite_case(dtype)
    values, indices = kernels.encode(x, sae)
    ref_v, ref_i = reference.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=2e-3, atol=2e-3)
    assert torch.equal(values.isnan(), ref_v.isnan())
    assert torch.equal(indices[4, :3].sort().values, torch.tensor([5, 77, 200], dtype=torch.int32))
    assert (values[4, 3:] == 0).all()  # ReLU(-inf), not the NaN of a sentinel


@cpu_only
def test_nan_rows_with_gpu_splits(monkeypatch):
    """The same rows through several latent splits and BN-128 tiles (sentinels per split, merged by torch.topk)."""
    sae, x = _nonfinite_case(torch.float32)
    monkeypatch.setattr(encode_mod, "encode_splits", lambda M, n, KP, cfg, dev: (3, 128))
    monkeypatch.setattr(encode_mod, "encode_config", lambda *a: encode_mod.EncodeConfig(BM=8, BN=128, BK=16, FEW=4,
                                                                                        num_warps=4, num_stages=1))
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=1e-4, atol=1e-4)


@cpu_only
def test_validation_matches_reference():
    sae = make_sae(16, 64, 4)
    for bad in (torch.randn(3, 15), torch.ones(3, 16, dtype=torch.int32)):
        with pytest.raises((ValueError, TypeError)):
            reference.encode(bad, sae)
        with pytest.raises((ValueError, TypeError)):
            kernels.encode(bad, sae)


@cpu_only
def test_folded_bias_cache_tracks_weight_updates():
    sae = make_sae(16, 64, 4)
    x = torch.randn(4, 16)
    kernels.encode(x, sae)
    with torch.no_grad():
        sae.b_dec.add_(1.0)
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices)


@cpu_only
def test_folded_bias_cache_never_serves_another_sae(monkeypatch):
    """Regression: the cache was keyed by data_ptr + version, so a new SAE allocated where a freed
    one lived (same shapes, same version count) got the old SAE's folded bias. Simulate the address
    reuse deterministically: two live SAEs whose tensors report the same data_ptr."""
    a, b = make_sae(16, 64, 4, seed=1), make_sae(16, 64, 4, seed=2)
    x = torch.randn(3, 16)
    kernels.clear_bias_cache()
    kernels.encode(x, a)
    cache = importlib.import_module("snce_fast.kernels._cache")
    (slot_a, (refs_a, _, bias_a)), = [(s, v) for s, v in cache._DERIVED.items() if s[1] == "folded_bias"]
    # a's entry filed under b, with b's addresses and versions (what a freed SAE's reused memory looks
    # like to an address-based key): only object identity tells them apart
    srcs_b = (b.W_enc, b.b_enc, b.b_dec)
    slot_b = (tuple(id(t) for t in srcs_b), "folded_bias")
    monkeypatch.setattr(cache, "_DERIVED", OrderedDict({slot_b: (refs_a, tuple(cache._state(t) for t in srcs_b), bias_a)}))
    values, indices = kernels.encode(x, b)
    assert_topk_matches(x, b, values, indices)
    # and after .data writes (which bump no version) clear_bias_cache() makes the cache honest again
    kernels.encode(x, b)
    b.b_dec.data.add_(1.0)
    kernels.clear_bias_cache()
    values, indices = kernels.encode(x, b)
    assert_topk_matches(x, b, values, indices)


@cpu_only
def test_backend_dispatch(monkeypatch):
    from snce_fast.ops import backend

    monkeypatch.setenv("SNCE_FAST_BACKEND", "triton")
    sae = make_sae(24, 96, 4)
    assert backend.implementation("encode", torch.device("cpu"))[0] == "triton"
    x = torch.randn(2, 5, 24)
    values, indices = sae.encode(x)
    assert_topk_matches(x, sae, values, indices)


@cpu_only
def test_opcheck_and_compile():
    sae = make_sae(32, 128, 3)
    x = torch.randn(4, 32)
    W, b = sae.W_enc.detach(), kernels.folded_bias(sae)
    torch.library.opcheck(torch.ops.snce_fast.encode_topk.default, (x, W, b, 3))
    torch.library.opcheck(torch.ops.snce_fast.encode_topk.default, (x.half(), W, b, 3, True))
    v16, _ = torch.ops.snce_fast.encode_topk(x.half(), W, b, 3, True)
    assert v16.dtype == torch.float16

    def f(x):
        v, i = torch.ops.snce_fast.encode_topk(x, W, b, 3)
        return v * 2, i

    # aot_eager on CPU: Inductor's CPU codegen takes ~40 s on 2 cores; the GPU test uses Inductor
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    ref = f(x)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


# --- GPU: real shapes, bf16 ------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("d,n,k", [(768, 32768, 64), (1024, 32768, 32), (1280, 32768, 64), (768, 524288, 64)])
@pytest.mark.parametrize("prompts", [1, 16])
def test_gpu_encode_real_shapes(d, n, k, prompts):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    sae = make_sae(d, n, k, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(prompts, 77, d, device="cuda", dtype=torch.bfloat16)
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_encode_many_prompts_single_split():
    """256 prompts: enough row blocks that each takes the whole latent range in one split."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    sae = make_sae(768, 32768, 64, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(256, 77, 768, device="cuda", dtype=torch.bfloat16)
    cfg = encode_mod.encode_config(256 * 77, 32768, 768, 64, torch.bfloat16, x.device)
    if encode_mod.encode_splits(256 * 77, 32768, 64, cfg, x.device)[0] != 1:
        pytest.skip("this GPU (or a tuned config) still splits the latents at 256 prompts")
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 17, 256])
def test_gpu_encode_k_range_and_fp32(k):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    sae = make_sae(384, 16384, k, device="cuda")
    x = torch.randn(300, 384, device="cuda")
    assert_topk_matches(x, sae, *kernels.encode(x, sae))


@pytest.mark.gpu
def test_gpu_compile_inductor():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    sae = make_sae(768, 32768, 64, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(77, 768, device="cuda", dtype=torch.bfloat16)
    W, b = sae.W_enc, kernels.folded_bias(sae)
    torch.library.opcheck(torch.ops.snce_fast.encode_topk.default, (x, W, b, 64))
    f = torch.compile(lambda x: torch.ops.snce_fast.encode_topk(x, W, b, 64), fullgraph=True)
    v, i = f(x)
    assert torch.equal(i, torch.ops.snce_fast.encode_topk(x, W, b, 64)[1])


def test_operand_dtype_dispatch():
    """fp16 activations with an fp32 SAE (the usual patch) took the exact fp32 path without tensor cores; they
    now upcast to fp32 tiles multiplied as tf32 (x exact in tf32, W_enc rounded to x's 10-bit mantissa)."""
    cfg = encode_mod.EncodeConfig(BM=16, BN=128, BK=32, FEW=4)
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32

    def mode(x, w):
        meta = encode_mod.kernel_meta(cfg, 64, x, w)
        return meta["UPCAST"], meta["PRECISION"], encode_mod.operand_dtype(x, w)

    assert mode(f16, f16) == (False, "tf32", f16)  # native 16-bit tensor cores
    assert mode(bf16, bf16) == (False, "tf32", bf16)
    assert mode(f16, f32) == (True, "tf32", f32)  # the patch case: tensor cores, fp32 tiles
    assert mode(bf16, f32) == (True, "tf32", f32)
    assert mode(f16, bf16) == (True, "tf32", f32)  # both exact in tf32
    assert mode(f32, f32) == (True, "ieee", f32)  # fp32 activations stay exact (the reference)
    assert mode(f32, bf16) == (True, "ieee", f32)


@cpu_only
@pytest.mark.parametrize("M,splits,k", [(0, 2, 3), (1, 1, 1), (3, 5, 17), (2, 70, 32), (4, 3, 64), (2, 9, 1)])
def test_merge_kernel_matches_torch_topk_of_keys(M, splits, k):
    """The tail (`_merge_topk_kernel`: merge of the per-split keys + unpack + ReLU, one launch) against the eager
    tail it replaced (torch.topk over the int64 keys, unpack, ReLU); several BS blocks when S > 1024, odd k,
    one token, no tokens, NaN / +-inf / negative values and sentinel-filled splits."""
    KP = encode_mod.next_pow2(k)
    S = splits * KP
    g = torch.Generator().manual_seed(S + k)
    vals = torch.randn(M, S, generator=g) * 3
    vals.view(-1)[::7] = float("nan")
    vals.view(-1)[::11] = float("-inf")
    vals.view(-1)[::13] = float("inf")
    cols = torch.randperm(max(M * S, 1), generator=g)[:M * S].reshape(M, S).int()  # unique per row
    b = vals.view(torch.int32)
    b = torch.where(vals.isnan(), torch.tensor(0x7FC00000, dtype=torch.int32), b)
    keys = ((b ^ ((b >> 31) & 0x7FFFFFFF)).long() << 32) | cols.long()
    if M and S > KP:
        keys[:, -KP // 2 - 1:] = torch.arange(KP // 2 + 1) + (-(2**63) + 1)  # sentinels of a short split
    for vdt in (torch.float32, torch.float16):
        values, indices = encode_mod.merge_keys(keys, k, vdt)
        want_v, want_i = encode_mod.unpack_keys(keys.topk(k, dim=1).values)
        assert values.dtype == vdt and indices.dtype == torch.int32 and values.shape == (M, k)
        assert torch.equal(indices, want_i)
        torch.testing.assert_close(values, want_v.relu().to(vdt), rtol=0, atol=0, equal_nan=True)


@cpu_only
@pytest.mark.parametrize(
    "M,d,n,k,dtype",
    [
        (1, 40, 300, 1, torch.float32),
        (5, 100, 1000, 17, torch.float32),   # 16 tiles: the buffer fills and is reduced many times
        (77, 48, 530, 17, torch.float16),
        (3, 33, 97, 17, torch.float32),      # n barely above k: a row holds fewer than KP entries
        (6, 40, 700, 64, torch.float32),
    ],
)
def test_compact_select_path_matches_reference(monkeypatch, M, d, n, k, dtype):
    """The "compact" selection (threshold filter + cumsum compaction into a per-(row, split) buffer, a top-KP
    only when a buffer would overflow and once at the end) against the reference."""
    monkeypatch.setattr(encode_mod, "SELECT", "compact")
    _encode_matches_reference(M, d, n, k, dtype)


@cpu_only
def test_compact_select_path_nan_rows_and_splits(monkeypatch):
    monkeypatch.setattr(encode_mod, "SELECT", "compact")
    sae, x = _nonfinite_case(torch.float32)
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(encode_mod, "encode_splits", lambda M, n, KP, cfg, dev: (3, 128))
    monkeypatch.setattr(encode_mod, "encode_config", lambda *a: encode_mod.EncodeConfig(BM=8, BN=128, BK=16, FEW=4,
                                                                                        num_warps=4, num_stages=1))
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="SNCE_FAST_ENCODE_SELECT='bogus'"):
        monkeypatch.setattr(encode_mod, "SELECT", "bogus")
        kernels.encode(x, sae)

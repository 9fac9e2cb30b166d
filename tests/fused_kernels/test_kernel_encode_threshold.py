"""The "threshold" selection of the fused encode (kernels/encode_threshold.py) against the eager reference."""
import dataclasses
import importlib
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

pytest.importorskip("triton")

from snce_fast import kernels  # noqa: E402
from snce_fast.ops import reference  # noqa: E402

from helpers_topk import assert_topk_matches, dyadic_inputs, frequent_latents, make_sae  # noqa: E402

encode_mod = importlib.import_module("snce_fast.kernels.encode_topk")
thr_mod = importlib.import_module("snce_fast.kernels.encode_threshold")

cpu_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

# GPU-like tiles under the interpreter (BM 64 x BN 64 and BM 32 x BN 128, one tile in 8 sampled: several sampled
# tiles even at small n)
_GPU_CFG = thr_mod.ThresholdConfig(BM=64, BN=64, BK=32, STRIDE=8, num_warps=4, num_stages=3)
_GPU_CFG_WIDE = thr_mod.ThresholdConfig(BM=32, BN=128, BK=32, STRIDE=8, num_warps=4, num_stages=3)
# the filter on the persistent grid: 4 programs under the interpreter (its "SM count"), each looping over tiles
_GPU_CFG_PERSISTENT = dataclasses.replace(_GPU_CFG, PERSISTENT=True)


@pytest.fixture(autouse=True)
def _threshold_path(monkeypatch):
    monkeypatch.setattr(encode_mod, "SELECT", "threshold")


def _case(M, d, n, k, dtype, seed=0):
    sae = make_sae(d, n, k, seed=M + d + seed)
    x = (torch.randn(M, d, generator=torch.Generator().manual_seed(1 + seed)) * 2).to(dtype)
    return sae, x


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-3


@cpu_only
@pytest.mark.parametrize(
    "M,d,n,k,dtype",
    [
        (0, 40, 300, 3, torch.float32),      # no tokens
        (1, 40, 300, 1, torch.float32),      # one token, k 1
        (5, 100, 1000, 17, torch.float32),   # odd k, n not a multiple of the tile
        (77, 48, 530, 17, torch.float16),    # a prompt's worth of tokens, more than one row block
        (3, 33, 97, 17, torch.float32),      # n barely above k
        (6, 40, 700, 64, torch.float32),
        (70, 64, 2048, 3, torch.float32),
    ],
)
def test_threshold_select_matches_reference(M, d, n, k, dtype):
    sae, x = _case(M, d, n, k, dtype)
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=_tol(dtype), atol=_tol(dtype))
    if M:  # the fast path was taken: every row's survivors fit its buffer (none recomputed)
        s = thr_mod.survivors(x, sae.W_enc, encode_mod.folded_bias(sae), k)
        assert int((s.counts > s.plan.CAP).sum()) == 0 and int((s.counts < k).sum()) == 0, s.counts


@cpu_only
@pytest.mark.parametrize("n,k", [(128, 128), (65, 65), (512, 128), (600, 100)])
def test_k_near_n(n, k):
    """k == n or k > n / 8: fewer group maxima than KP (they crashed in the sort of the maxima)."""
    sae, x = _case(3, 24, n, k, torch.float32)
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices)


@cpu_only
@pytest.mark.parametrize("cfg", [_GPU_CFG, _GPU_CFG_WIDE, _GPU_CFG_PERSISTENT], ids=["BN64", "BN128", "persistent"])
@pytest.mark.parametrize("M,d,n,k,dtype", [(1, 72, 4100, 64, torch.float16), (70, 40, 3000, 17, torch.float32),
                                             (9, 40, 1300, 5, torch.float16)])
def test_threshold_select_with_gpu_tiles(monkeypatch, cfg, M, d, n, k, dtype):
    """The GPU tiles and sampling (several sampled tiles, sub-tile groups; BN 64 and the BN 128 of more than 128
    tokens; the persistent filter grid), mixed dtypes (16-bit x, fp32 SAE)."""
    monkeypatch.setattr(thr_mod, "threshold_config", lambda M, dtype, device: cfg)
    sae, x = _case(M, d, n, k, dtype)
    sae = sae.float()
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=3e-3, atol=3e-3)


@cpu_only
def test_survivors_hold_the_top_k_and_few_more(monkeypatch):
    """The threshold is a lower bound of each row's k-th value (every true top-k entry survives), and tight:
    on a random SAE about 1.4 k * STRIDE entries survive per row (here < 3 k * STRIDE), far below CAP."""
    monkeypatch.setattr(thr_mod, "threshold_config", lambda M, dtype, device: _GPU_CFG)
    M, d, n, k = 33, 64, 4096, 16
    sae, x = _case(M, d, n, k, torch.float32)
    bias = encode_mod.folded_bias(sae)
    s = thr_mod.survivors(x, sae.W_enc, bias, k)
    assert s.plan.NS == 8 and s.plan.step == 8 and s.plan.G >= 2 * k
    counts = s.counts.long()
    assert (counts >= k).all() and (counts <= s.plan.CAP).all(), counts
    assert counts.float().mean() < 3 * k * s.plan.step, counts.float().mean()
    want = reference.pre_activations(x, sae).topk(k, dim=1).indices
    for r in range(M):
        got = set((s.keys[r, :counts[r]] & 0xFFFFFFFF).tolist())
        assert set(want[r].tolist()) <= got, r
    assert int(thr_mod._tickets(x.device, s.plan.MB)[:s.plan.MB].abs().sum()) == 0  # left ready for the next launch


@cpu_only
def test_overflowing_rows_are_recomputed_not_truncated(monkeypatch):
    """Rows whose survivors overflow the buffer (a tiny CAP here; NaN rows and degenerate SAEs in use) take the
    direct path: still the exact top k."""
    monkeypatch.setattr(thr_mod, "CAP_FACTOR", 0)
    M, d, n, k = 7, 40, 900, 9
    sae, x = _case(M, d, n, k, torch.float32)
    s = thr_mod.survivors(x, sae.W_enc, encode_mod.folded_bias(sae), k)
    assert s.plan.CAP == 16 and (s.counts > s.plan.CAP).all()  # every row overflows
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=1e-4, atol=1e-4)


@cpu_only
@pytest.mark.parametrize("dtype,n", [(torch.float32, 300), (torch.float16, 300), (torch.float32, 3000)])
def test_nan_and_inf_rows(dtype, n):
    """NaN ranks first (as torch.topk), +-inf rows, a row with fewer than k values above -inf; at n 3000 the
    all-NaN row overflows its buffer and is recomputed."""
    d, k = 40, 17
    sae = make_sae(d, n, k, seed=4)
    with torch.no_grad():
        sae.W_enc[0].copy_(-sae.W_enc[0].abs())
        sae.W_enc[0, [5, 77, 200]] = 1.0
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(3))
    x[1, 3] = float("nan")
    x[2, 1] = float("inf")
    x[3, 1], x[3, 2] = float("inf"), float("-inf")
    x[4, 0] = float("inf")
    x = x.to(dtype)
    values, indices = kernels.encode(x, sae)
    ref_v, _ = reference.encode(x, sae)
    assert_topk_matches(x, sae, values, indices, rtol=2e-3, atol=2e-3)
    assert torch.equal(values.isnan(), ref_v.isnan())
    assert torch.equal(indices[4, :3].sort().values, torch.tensor([5, 77, 200], dtype=torch.int32))
    s = thr_mod.survivors(x, sae.W_enc, encode_mod.folded_bias(sae), k)
    assert int(s.counts[1]) == n and (n > s.plan.CAP) == (n == 3000)  # every NaN survives


@cpu_only
def test_all_equal_pre_activations():
    """A zero SAE: every entry ties, all survive and overflow the buffer (recomputed): k distinct indices, values 0."""
    d, n, k = 24, 5000, 11
    sae = make_sae(d, n, k, seed=2)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(5))
    values, indices = kernels.encode(x, sae)
    assert_topk_matches(x, sae, values, indices)
    assert (values == 0).all()
    s = thr_mod.survivors(x, sae.W_enc, encode_mod.folded_bias(sae), k)
    assert (s.counts == n).all() and n > s.plan.CAP


@cpu_only
def test_repeated_calls_agree():
    """The tickets are reset by each launch: a second call (and one with another row count) gives the same."""
    sae, x = _case(70, 40, 1000, 17, torch.float32)
    v1, i1 = kernels.encode(x, sae)
    kernels.encode(x[:5], sae)
    v2, i2 = kernels.encode(x, sae)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)


@cpu_only
@pytest.mark.parametrize("kw", [dict(), dict(clamp=0.1), dict(scale=0.5, edit_mask=True)])
def test_patched_edit_by_threshold_matches_reference(kw):
    B, L, d, n, k = 2, 6, 24, 300, 17
    sae = make_sae(d, n, k)
    x = torch.randn(B, L, d, generator=torch.Generator().manual_seed(1))
    neurons = frequent_latents(x, sae)
    if kw.pop("edit_mask", False):
        kw["edit_mask"] = (torch.arange(L) >= 1).expand(B, L)
    out = kernels.edit(x, sae, neurons, **kw)
    torch.testing.assert_close(out, reference.edit(x, sae, neurons, **kw), rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, x)


@cpu_only
def test_persistent_grid_option(monkeypatch):
    """SNCE_FAST_THRESHOLD_GRID: "persistent" runs the filter on min(tiles, SMs) programs (the same result as one
    program per tile); a bad value is refused by name."""
    sae, x = _case(70, 40, 1000, 17, torch.float32)
    want = kernels.encode(x, sae)
    assert thr_mod._plan(x, sae.W_enc, 17).cfg.PERSISTENT is False
    monkeypatch.setattr(thr_mod, "GRID", "persistent")
    plan = thr_mod._plan(x, sae.W_enc, 17)
    assert plan.cfg.PERSISTENT and plan.MB * plan.NT == 32
    assert thr_mod.filter_programs(plan, 4) == 4 and thr_mod.filter_programs(plan, 132) == 32
    assert thr_mod.filter_programs(dataclasses.replace(plan, cfg=_GPU_CFG), 4) == 32
    got = kernels.encode(x, sae)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    monkeypatch.setattr(thr_mod, "GRID", "bogus")
    with pytest.raises(ValueError, match="SNCE_FAST_THRESHOLD_GRID='bogus'"):
        kernels.encode(x, sae)


def test_programmatic_dependent_launch_only_on_nvidia_gpus(monkeypatch):
    """The filter's early start (PDL: `gdc_wait` in the kernel, `launch_pdl` at launch) applies to CUDA devices of
    compute capability 9.0+ outside the interpreter, and SNCE_FAST_THRESHOLD_PDL=0 (`PDL`) turns it off."""
    assert not thr_mod.uses_pdl(torch.device("cpu"))
    monkeypatch.setattr(thr_mod, "uses_ptx", lambda device: True)
    for cap, pdl, want in (((9, 0), True, True), ((10, 0), True, True), ((8, 0), True, False), ((9, 0), False, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        monkeypatch.setattr(thr_mod, "PDL", pdl)
        assert thr_mod.uses_pdl(torch.device("cuda")) is want, (cap, pdl)


def test_gpu_persistent_configs():
    """The persistent grid keeps each GPU tile but runs 8 warps at BM 256 (16 warps' 128-register cap spills the
    flattened loop: docs/kernels.md)."""
    for M, itemsize in ((1, 2), (77, 2), (1232, 2), (1232, 4)):
        base = thr_mod.gpu_threshold_config(M, itemsize)
        p = thr_mod.gpu_threshold_config(M, itemsize, persistent=True)
        assert p.PERSISTENT and not base.PERSISTENT and (p.BM, p.BN, p.BK) == (base.BM, base.BN, base.BK)
        assert p.num_warps == (8 if base.BM == 256 else base.num_warps)


@cpu_only
def test_survivors_op_fake():
    """The opaque op of the two matmul launches: its fake gives the real shapes and dtypes (torch.compile sees only
    the fake; the compiled path itself runs on a GPU: test_gpu_compile_inductor_threshold)."""
    sae, x = _case(9, 40, 1300, 5, torch.float32)
    bias = encode_mod.folded_bias(sae)
    torch.library.opcheck(torch.ops.snce_fast.threshold_survivors.default, (x, sae.W_enc.detach(), bias, sae.k),
                          test_utils=("test_schema", "test_faketensor"))


# --- GPU (first GPU session): the ticket and the atomics on real hardware ---------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("prompts,k,dtype,grid,pdl", [(1, 64, torch.bfloat16, "tiles", True),
                                                      (16, 64, torch.bfloat16, "tiles", True),
                                                      (16, 17, torch.float16, "tiles", True),
                                                      (3, 256, torch.bfloat16, "tiles", True),
                                                      (16, 64, torch.bfloat16, "tiles", False),
                                                      (1, 64, torch.bfloat16, "persistent", True),
                                                      (16, 64, torch.bfloat16, "persistent", True)])
def test_gpu_threshold_real_shapes(monkeypatch, prompts, k, dtype, grid, pdl):
    """SPEC shape (d 768, n 32768) on the GPU tiles (and the persistent filter grid; with and without the filter's
    programmatic dependent launch): the tickets back at zero after a call, a second input, and two captured CUDA
    graphs replayed out of order: every result a valid top-k of the reference."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    monkeypatch.setattr(thr_mod, "GRID", grid)
    monkeypatch.setattr(thr_mod, "PDL", pdl)
    assert thr_mod.uses_pdl(torch.device("cuda")) is (pdl and torch.cuda.get_device_capability()[0] >= 9)
    sae = make_sae(768, 32768, k, dtype=dtype, device="cuda")
    x = torch.randn(prompts * 77, 768, device="cuda", dtype=dtype)
    first = kernels.encode(x, sae)
    assert_topk_matches(x, sae, *first, rtol=2e-2, atol=2e-2)
    s = thr_mod.survivors(x, sae.W_enc, encode_mod.folded_bias(sae), k)
    torch.cuda.synchronize()
    assert int(thr_mod._tickets(x.device, s.plan.MB)[:s.plan.MB].abs().sum()) == 0  # reset for the next launch
    assert int((s.counts < k).sum()) == 0 and int((s.counts > s.plan.CAP).sum()) == 0
    x2 = torch.randn_like(x)  # a different input: stale thresholds or keys of the first call would show
    assert_topk_matches(x2, sae, *kernels.encode(x2, sae), rtol=2e-2, atol=2e-2)
    # two captured graphs, the second replayed first: each holds its own zeroed tickets
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernels.encode(x, sae)
    torch.cuda.current_stream().wait_stream(side)
    graphs, outs = [], []
    for xi in (x, x2):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(kernels.encode(xi, sae))
        graphs.append(g)
    for g in reversed(graphs):
        g.replay()
    graphs[0].replay()
    torch.cuda.synchronize()
    assert torch.equal(outs[0][1], first[1])
    assert_topk_matches(x2, sae, *outs[1], rtol=2e-2, atol=2e-2)


def _assert_buffer_is_the_replay(M, d, n, k, dtype, device):
    """On dyadic inputs every fp32 sum is exact, so the kernel's tiles equal numpy's: each row's buffer must hold
    exactly the replayed survivors (every entry not below the row's threshold value), each once, with its `_pack`
    key: no entry lost, none appended twice, no column past n (n is not a multiple of the tile). Row 1 holds a NaN:
    every entry survives and overflows the buffer, whose CAP keys must still be distinct, valid and exact (NaN
    keys canonical). Row 2 is zero, so its values are the all-negative bias (negative keys). The buffers are
    views of larger ones filled with sentinels: rows past M and slots past CAP must stay untouched."""
    from snce_fast.kernels import cost_threshold

    x, W, bias = dyadic_inputs(M, d, n, seed=M + n)
    x[1, 2] = float("nan")
    x[2] = 0.0
    bias -= 3  # -5 .. -1
    xd, Wd, bd = x.to(device, dtype), W.to(device, dtype), bias.to(device)
    plan = thr_mod._plan(xd, Wd, k)
    big_keys = torch.full((M + 64, plan.CAP + 8), -5, dtype=torch.int64, device=device)
    big_counts = torch.full((M + 64,), -7, dtype=torch.int32, device=device)
    thr_mod.launch_survivors(xd, Wd, bd, k, plan, big_keys[:M, :plan.CAP], big_counts[:M])
    assert (big_keys[M:] == -5).all() and (big_keys[:, plan.CAP:] == -5).all() and (big_counts[M:] == -7).all()
    rep = cost_threshold.replay_survivors(x.numpy(), W.numpy(), bias.numpy(), k, plan, thr_mod.MARGIN)
    counts = big_counts[:M].cpu().numpy()
    assert counts.tolist() == rep["counts"].tolist() and counts[1] == n > plan.CAP
    pre = x.numpy() @ W.numpy() + bias.numpy()[None, :]
    want = ~(pre < cost_threshold.threshold_values(rep["thresholds"])[:, None])
    assert (pre[2][want[2]] < 0).all() and want[2].sum() >= k
    keys = big_keys[:M].cpu()
    for r in range(M):
        row = keys[r, :min(counts[r], plan.CAP)]
        cols = (row & 0xFFFFFFFF).numpy()
        assert len(set(cols.tolist())) == len(cols) and (cols < n).all()
        if counts[r] <= plan.CAP:
            assert set(cols.tolist()) == set(np.flatnonzero(want[r]).tolist())
        else:
            assert want[r][cols].all()
        assert torch.equal(row >> 32, torch.from_numpy(cost_threshold.order_keys(pre[r, cols])).long())


@cpu_only
@pytest.mark.parametrize("cfg", [None, _GPU_CFG_WIDE, _GPU_CFG_PERSISTENT], ids=["interpreter-tile", "BN128",
                                                                              "persistent"])
def test_filter_appends_exactly_the_replayed_survivors(monkeypatch, cfg):
    """The filter's append (here the interpreter's `tl.atomic_add` form of the rule) against the replay
    (fp16: the interpreter's bf16 dot is wrong in triton 3.9). On the persistent grid (4 programs for 2 x 65 tiles)
    exact counts also mean every tile was filtered once: none skipped, none twice (70 rows: two row blocks)."""
    if cfg is not None:
        monkeypatch.setattr(thr_mod, "threshold_config", lambda M, dtype, device: cfg)
    M = 70 if cfg is _GPU_CFG_PERSISTENT else 20
    _assert_buffer_is_the_replay(M, 64, 4100, 16, torch.float16, "cpu")  # 4,100: not a multiple of 64 or 128


@pytest.mark.gpu
@pytest.mark.parametrize("grid", ["tiles", "persistent"])
@pytest.mark.parametrize("prompts", [1, 16])
def test_gpu_filter_appends_exactly_the_replayed_survivors(monkeypatch, prompts, grid):
    """The PTX epilogue (`_append_ptx`, GPU only) at the SPEC shape but n 32,731 (its column check fires) and the
    GPU tiles (BM 128 x BN 64 for one prompt, its padded rows 77..127; BM 256 x BN 128 for 16), bf16 on tensor
    cores, one program per tile or on the persistent grid: `_assert_buffer_is_the_replay`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    monkeypatch.setattr(thr_mod, "GRID", grid)
    _assert_buffer_is_the_replay(prompts * 77, 768, 32731, 64, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_gpu_compile_inductor_threshold():
    """torch.compile (Inductor, fullgraph) of the threshold path: the encode op traced, the survivors op called as
    one opaque node (its PTX epilogue would make Inductor copy x, W_enc and the bias), the result equal to eager."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    from torch._inductor.utils import run_and_get_code

    sae = make_sae(768, 32768, 64, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(77, 768, device="cuda", dtype=torch.bfloat16)
    W, b = sae.W_enc, encode_mod.folded_bias(sae)
    f = torch.compile(lambda x: torch.ops.snce_fast.encode_topk(x, W, b, 64), fullgraph=True)
    (v, i), code = run_and_get_code(f, x)
    v0, i0 = torch.ops.snce_fast.encode_topk(x, W, b, 64)
    assert torch.equal(i, i0) and torch.equal(v, v0)
    assert "threshold_survivors" in "\n".join(code)

"""histogram_update: the C++ op == the eager torch update == a NumPy recount, exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from snce_fast.ops import _ext, histogram as H

needs_ext = pytest.mark.skipif(_ext.load() is None, reason="C++ extension not built")


def _batch(P, L, k, n, G, seed, dtype=torch.float32, dup=False):
    g = torch.Generator().manual_seed(seed)
    M = P * L
    idx = torch.randint(0, n, (M, k), generator=g, dtype=torch.int32)
    if dup and M > 1:  # the same latent on every token of a prompt
        idx[:, 0] = 3
    # multiples of 1/64: float64 sums are exact whatever the order
    val = ((torch.randn(M, k, generator=g) * 64).round() / 64).to(dtype)
    mask = torch.rand(M, generator=g) > 0.25
    gop = torch.randint(0, G, (P,), generator=g)
    return idx, val, mask, H.batch_layout(P, L), gop


def _run_all(batches, G, n, threshold=0.0):
    op, eager = H.Histograms.zeros(G, n), H.Histograms.zeros(G, n)
    total = {f: 0 for f in H.STATE_FIELDS}
    for b in batches:
        H.update(*b, op, threshold, backend="op")
        H.update(*b, eager, threshold, backend="eager")
        r = H.recount_numpy(*b, G, n, threshold)
        total = {f: total[f] + r[f] for f in H.STATE_FIELDS}
    return op, eager, total


CASES = [
    dict(P=4, L=9, k=5, n=37, G=2),  # k not a power of two
    dict(P=1, L=1, k=1, n=8, G=1),  # M = 1
    dict(P=0, L=5, k=3, n=16, G=2),  # empty batch
    dict(P=3, L=6, k=7, n=130, G=3, dup=True),  # duplicate latents across tokens of a prompt
    dict(P=16, L=12, k=16, n=1000, G=2),
]


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_op_eager_numpy_agree(case):
    case = dict(case)
    dup = case.pop("dup", False)
    G, n = case["G"], case["n"]
    batches = [_batch(**case, seed=s, dup=dup) for s in range(3)]
    op, eager, want = _run_all(batches, G, n)
    for f in H.STATE_FIELDS:
        assert torch.equal(getattr(op, f), getattr(eager, f)), f
        assert np.array_equal(getattr(op, f).numpy(), want[f]), f


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_dtypes_and_threshold(dtype, threshold):
    batches = [_batch(5, 7, 6, 50, 2, seed=s, dtype=dtype) for s in range(2)]
    op, eager, want = _run_all(batches, 2, 50, threshold)
    for f in H.STATE_FIELDS:
        assert torch.equal(getattr(op, f), getattr(eager, f)), f
        assert np.array_equal(getattr(op, f).numpy(), want[f]), f


@needs_ext
def test_prompts_not_contiguous():
    """Tokens of one prompt interleaved with another's still count the prompt once."""
    idx = torch.tensor([[1, 2], [1, 3], [1, 2], [2, 4]], dtype=torch.int32)
    val = torch.ones(4, 2)
    pot = torch.tensor([0, 1, 0, 1])
    gop = torch.tensor([0, 0])
    st = H.Histograms.zeros(1, 5)
    H.update(idx, val, torch.ones(4, dtype=torch.bool), pot, gop, st, backend="op")
    assert st.prompts_fired[0].tolist() == [0, 2, 2, 1, 1]
    assert st.tokens_fired[0].tolist() == [0, 3, 3, 1, 1]
    assert st.n_prompts.tolist() == [2] and st.n_tokens.tolist() == [4]


@needs_ext
def test_thread_count_does_not_change_result():
    b = _batch(8, 10, 9, 300, 2, seed=7)
    b = (b[0], torch.randn(80, 9, generator=torch.Generator().manual_seed(1)), *b[2:])  # inexact sums
    old = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            st = H.Histograms.zeros(2, 300)
            H.update(*b, st, backend="op")
            out.append(st)
    finally:
        torch.set_num_threads(old)
    for f in H.STATE_FIELDS:
        assert torch.equal(getattr(out[0], f), getattr(out[1], f)), f


@needs_ext
def test_bad_inputs_raise_clearly():
    idx, val, mask, pot, gop = _batch(2, 3, 2, 10, 1, seed=0)
    st = H.Histograms.zeros(1, 10)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 10\)"):
        H.update(idx + 10, val, mask, pot, gop, st, backend="op")
    with pytest.raises(RuntimeError, match="group_of_prompt must lie"):
        H.update(idx, val, mask, pot, gop + 1, st, backend="op")
    with pytest.raises(RuntimeError, match="act_sum must be Double"):
        torch.ops.snce_fast.histogram_update(idx, val, mask, pot, gop, st.prompts_fired, st.tokens_fired,
                                             st.act_sum.float(), st.n_prompts, st.n_tokens)
    with pytest.raises(ValueError, match=r"must have one shape \[M, k\]"):
        H.update(idx, val[:, :1], mask, pot, gop, st)


@needs_ext
def test_out_of_range_token_maps_raise_before_any_update():
    """Every index map is range-checked before a counter moves (the CUDA op's totals kernel had no check;
    it now asserts on device for the same conditions, `test_gpu_out_of_range_trips_device_assert`)."""
    idx, val, mask, pot, gop = _batch(2, 3, 2, 10, 2, seed=0)
    for bad_pot, what in ((pot + 2, r"\[0, 2\)"), (pot - 1, r"\[0, 2\)")):
        st = H.Histograms.zeros(2, 10)
        with pytest.raises(RuntimeError, match=r"prompt_of_token must lie in " + what):
            H.update(idx, val, mask, bad_pot, gop, st, backend="op")
        assert all(int(getattr(st, f).abs().sum()) == 0 for f in H.STATE_FIELDS)
    st = H.Histograms.zeros(2, 10)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 10\)"):
        H.update(idx - 5, val, ~mask.fill_(True), pot, gop, st, backend="op")  # masked tokens are checked too
    with pytest.raises(RuntimeError, match=r"group_of_prompt must lie in \[0, 2\)"):
        H.update(idx, val, mask, pot, gop - 3, st, backend="op")
    assert all(int(getattr(st, f).abs().sum()) == 0 for f in H.STATE_FIELDS)


@needs_ext
def test_opcheck():
    idx, val, mask, pot, gop = _batch(3, 4, 3, 20, 2, seed=3)
    state = H.Histograms.zeros(2, 20).tensors()
    torch.library.opcheck(torch.ops.snce_fast.histogram_update.default, (idx, val, mask, pot, gop, *state.values()),
                          {"threshold": 0.25})


def test_itd_update_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    P, L, k, n, top = 4, 6, 5, 40, 3
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(P * L)]).int()
    val = torch.rand(P * L, k, generator=g)
    mask = torch.rand(P * L, generator=g) > 0.3
    gop = torch.tensor([0, 1, 0, 1])
    itd = torch.zeros(2, n, dtype=torch.int64)
    H.itd_update(idx, val, mask, P, gop, itd, top=top, chunk_elements=2 * n)  # 2 prompts per chunk
    want = torch.zeros(2, n, dtype=torch.int64)
    for p in range(P):
        best: dict[int, float] = {}
        for m in range(p * L, (p + 1) * L):
            if mask[m]:
                for j, v in zip(idx[m].tolist(), val[m].tolist()):
                    best[j] = max(best.get(j, 0.0), v)
        for j in sorted(best, key=lambda j: -best[j])[:top]:
            want[gop[p], j] += 1
    assert torch.equal(itd, want)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gpu_op_matches_numpy_recount(case):
    """The CUDA build of histogram_update (csrc/histogram_cuda.cu): exact counts on the GPU."""
    if not _ext.built_with_cuda():
        pytest.skip("extension built without CUDA")
    case = dict(case)
    dup = case.pop("dup", False)
    G, n = case["G"], case["n"]
    state = H.Histograms.zeros(G, n, device="cuda")
    want = {f: 0 for f in H.STATE_FIELDS}
    for s in range(3):
        b = _batch(**case, seed=s, dup=dup)
        H.update(*(t.cuda() for t in b), state, 0.0, backend="op")
        r = H.recount_numpy(*b, G, n, 0.0)
        want = {f: want[f] + r[f] for f in H.STATE_FIELDS}
    for f in H.STATE_FIELDS:
        assert np.array_equal(getattr(state, f).cpu().numpy(), want[f]), f


@pytest.mark.gpu
def test_gpu_act_sum_is_deterministic_and_equals_cpu():
    """act_sum was summed with float64 atomics (order-dependent last bits); the CUDA op now adds each cell's
    entries in token order after a stable sort: bit-identical to the CPU op's, and run to run."""
    if not _ext.built_with_cuda():
        pytest.skip("extension built without CUDA")
    b = _batch(64, 77, 32, 50, 2, seed=7, dup=True)  # n 50: many entries per cell
    b = (b[0], torch.randn(64 * 77, 32, generator=torch.Generator().manual_seed(1)), *b[2:])  # inexact sums
    cpu = H.Histograms.zeros(2, 50)
    H.update(*b, cpu, backend="op")
    runs = []
    for _ in range(3):
        st = H.Histograms.zeros(2, 50, device="cuda")
        H.update(*(t.cuda() for t in b), st, backend="op")
        runs.append(st.act_sum.cpu())
    assert cpu.act_sum.abs().sum() > 0
    for r in runs:
        assert torch.equal(r, cpu.act_sum)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", ["prompt_of_token", "group_of_prompt", "indices"])
def test_gpu_out_of_range_trips_device_assert(bad):
    """Out-of-range maps trip a device-side assert (no host sync); run in a child process, whose CUDA context
    the assert poisons."""
    import subprocess
    import sys
    if not _ext.built_with_cuda():
        pytest.skip("extension built without CUDA")
    code = f"""
import torch
from snce_fast.ops import histogram as H
idx = torch.zeros(6, 2, dtype=torch.int32); val = torch.ones(6, 2); mask = torch.ones(6, dtype=torch.bool)
pot, gop = H.batch_layout(2, 3), torch.zeros(2, dtype=torch.long)
bad = "{bad}"
if bad == "prompt_of_token": pot = pot + 5
if bad == "group_of_prompt": gop = gop + 5
if bad == "indices": idx = idx + 99
st = H.Histograms.zeros(1, 10, device="cuda")
H.update(*(t.cuda() for t in (idx, val, mask, pot, gop)), st, backend="op")
torch.cuda.synchronize()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "assert" in (r.stdout + r.stderr).lower(), r.stderr[-2000:]

"""kernels/_cache.py: weight-derived tensors and device constants made once, and their CUDA-graph rules
(capture is simulated on the CPU by making `_capturing` say so)."""
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

pytest.importorskip("triton")

from snce_fast import kernels  # noqa: E402
from snce_fast.ops import reference  # noqa: E402

from helpers_topk import make_sae  # noqa: E402

cache = importlib.import_module("snce_fast.kernels._cache")
cpu_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tests need TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    from collections import OrderedDict

    monkeypatch.setattr(cache, "_DERIVED", OrderedDict())
    monkeypatch.setattr(cache, "_CONSTANTS", OrderedDict())
    monkeypatch.setattr(cache, "_PINNED", {})


def test_derived_is_made_once_and_remade_after_an_in_place_update():
    w = torch.randn(4, 3)
    calls = []
    f = lambda: calls.append(1) or w.sum(0)  # noqa: E731
    a = cache.derived((w,), "k", f)
    assert cache.derived((w,), "k", f) is a and len(calls) == 1
    assert cache.derived((w,), "other", f) is not a and len(calls) == 2  # keys are separate
    w.add_(1.0)
    assert torch.equal(cache.derived((w,), "k", f), w.sum(0)) and len(calls) == 3


def test_inference_tensors_are_cached_without_a_version_counter():
    with torch.inference_mode():
        w = torch.randn(4, 3)
    assert w.is_inference()
    calls = []
    a = cache.derived((w,), "k", lambda: calls.append(1) or w.sum(0))
    assert cache.derived((w,), "k", lambda: calls.append(1) or w.sum(0)) is a and len(calls) == 1


@cpu_only
def test_a_patch_made_under_inference_mode_runs_the_fused_edit():
    """Regression: the state's W_dec[T] is an inference tensor when patching under inference_mode, and
    reading its version counter raised on every fused call."""
    from snce_fast.hooks.patching import _PatchState

    sae = make_sae(24, 96, 4)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    _, idx = reference.encode(x, sae)
    j = [int(torch.bincount(idx.flatten().long(), minlength=96).argmax())]
    opts = dict(scale=0.0, clamp=None, mode="residual", gate=False, min_tokens=1, threshold=0.0)
    with torch.inference_mode():
        state = _PatchState(sae, j, opts, None)
        assert state.W_dec_targets.is_inference()
        out = kernels.edit(x, state, j)
        again = kernels.edit(x, state, j)
    torch.testing.assert_close(out, reference.edit(x, sae, j), rtol=1e-5, atol=1e-5)
    assert torch.equal(again, out)


def test_during_capture_a_miss_is_computed_not_stored_and_hits_are_pinned(monkeypatch):
    w = torch.randn(4, 3)
    monkeypatch.setattr(cache, "_capturing", lambda: True)
    v = cache.derived((w,), "k", lambda: w.sum(0))
    assert torch.equal(v, w.sum(0)) and len(cache._DERIVED) == 0 and not cache._PINNED  # made by the graph itself
    monkeypatch.setattr(cache, "_capturing", lambda: False)
    warm = cache.derived((w,), "k", lambda: w.sum(0))
    t = cache.constant([3, 7], torch.int32, "cpu")
    monkeypatch.setattr(cache, "_capturing", lambda: True)
    assert cache.derived((w,), "k", lambda: w.sum(0)) is warm
    assert cache.constant([3, 7], torch.int32, "cpu") is t
    assert set(cache._PINNED) == {id(warm), id(t)}  # the graph holds their addresses: never freed
    cache.clear()
    assert cache._PINNED[id(warm)] is warm
    with pytest.raises(RuntimeError, match=r"cannot be copied there during CUDA graph capture: run the same call once"):
        cache.constant([1, 2], torch.int32, "cpu")


def test_clear_keeps_constants():
    t = cache.constant([1.0, 2.0], torch.float32, "cpu")
    cache.derived((torch.ones(2),), "k", lambda: torch.zeros(1))
    cache.clear()
    assert len(cache._DERIVED) == 0 and cache.constant([1.0, 2.0], torch.float32, "cpu") is t


@cpu_only
def test_under_compile_a_patch_uses_its_folded_bias_made_at_patch_time(monkeypatch):
    """A compiled graph would otherwise fold b_dec @ W_enc (a second read of W_enc) on every call."""
    from snce_fast.hooks.patching import _PatchState

    sae = make_sae(24, 96, 4)
    opts = dict(scale=0.0, clamp=None, mode="residual", gate=False, min_tokens=1, threshold=0.0)
    state = _PatchState(sae, [3], opts, None)
    torch.testing.assert_close(state.b_enc_folded, kernels.folded_bias(sae))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    folded = []
    monkeypatch.setattr(importlib.import_module("snce_fast.kernels.encode_topk"), "folded_encoder_bias",
                        lambda *a: folded.append(1) or reference.folded_encoder_bias(*a))
    assert torch.equal(kernels.folded_bias(state), state.b_enc_folded) and folded == []
    kernels.folded_bias(sae)  # a plain SAE has none: folded in the graph
    assert folded == [1]

"""Launches per call of the fused ops, counted on the CPU (docs/kernels.md, "Launches per call").

Every triton launch of the kernel modules is counted (their `wrap_triton` wrapped), and every aten op that
would launch a GPU kernel (a TorchDispatchMode over the whole call, entering our own ops' Python bodies;
views and allocations, which launch nothing, are not counted). Before the tail was fused, `encode` was one
triton launch + torch.topk over the keys + about seven unpack ops, and the patch's residual edit about 13.
"""
import contextlib
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest

pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from snce_fast import kernels  # noqa: E402
from snce_fast.ops import reference  # noqa: E402

from helpers_topk import frequent_latents, make_sae  # noqa: E402

encode_mod = importlib.import_module("snce_fast.kernels.encode_topk")
edit_mod = importlib.import_module("snce_fast.kernels.snce_edit")
decode_mod = importlib.import_module("snce_fast.kernels.sparse_decode")
thr_mod = importlib.import_module("snce_fast.kernels.encode_threshold")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
              "alias", "_reshape_alias", "_unsafe_view", "view", "expand"}


class _Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten: list[str] = []
        self.triton: list[str] = []
        # our ops are opaque custom ops under the interpreter: run their Python bodies under this mode
        self.bodies = {f"snce_fast::{op._name.split('::')[-1]}": op._init_fn
                       for op in (encode_mod.encode_topk, edit_mod.edit_residual, edit_mod.edit_residual_keys,
                                  edit_mod.edit_residual_threshold, decode_mod.sparse_decode,
                                  thr_mod._survivors_op)
                       if hasattr(op, "_init_fn")}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = self.bodies.get(f"{func.namespace}::{func._opname}")
        if body is not None:
            with self:
                return body(*args, **kwargs)
        if not func.is_view and func._opname not in _NO_LAUNCH:
            self.aten.append(func._opname)
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return len(self.aten) + len(self.triton)


@contextlib.contextmanager
def _count(monkeypatch):
    mode = _Launches()
    for mod in (encode_mod, edit_mod, decode_mod, thr_mod):
        real = mod.wrap_triton

        def counting(kernel, real=real):
            def grid(g):
                def launch(*a, **kw):
                    mode.triton.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
                    with _disable_current_modes():  # the interpreter's own tensor copies are not launches
                        return real(kernel)[g](*a, **kw)
                return launch
            return type("Counting", (), {"__getitem__": lambda self, g: grid(g)})()

        monkeypatch.setattr(mod, "wrap_triton", counting)
    with mode:
        yield mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_encode_is_two_launches(monkeypatch, dtype):
    sae = make_sae(24, 300, 17).to(dtype)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    kernels.encode(x, sae)  # warm-up: the folded bias is made and cached once
    with _count(monkeypatch) as n:
        kernels.encode(x, sae)
    assert n.triton == ["_encode_topk_kernel", "_merge_topk_kernel"] and n.aten == [], (n.triton, n.aten)


def test_patched_residual_edit_is_two_launches(monkeypatch):
    """The patch's call (residual, no gate, the BOS mask as a stride-0 expand): encode kernel + fused edit."""
    B, L, d, n, k = 2, 6, 24, 300, 17
    sae = make_sae(d, n, k)
    x = torch.randn(B, L, d, generator=torch.Generator().manual_seed(1))
    neurons = frequent_latents(x, sae)
    edit_mask = (torch.arange(L) >= 1).expand(B, L)
    for kw in (dict(edit_mask=edit_mask), dict(), dict(clamp=0.1, edit_mask=edit_mask)):
        want = reference.edit(x, sae, neurons, **kw)
        kernels.edit(x, sae, neurons, **kw)  # warm-up: constants and decoder rows cached
        with _count(monkeypatch) as cnt:
            out = kernels.edit(x, sae, neurons, **kw)
        assert cnt.triton == ["_encode_topk_kernel", "_edit_keys_kernel"] and cnt.aten == [], (cnt.triton, cnt.aten)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert not torch.equal(out, x)


def _patch_state(sae, neurons: list[int], **options):
    from snce_fast.hooks.patching import _PatchState

    opts = dict(scale=0.0, clamp=None, mode="residual", gate=False, min_tokens=1, threshold=0.0)
    return _PatchState(sae, neurons, {**opts, **options}, None)


def test_patch_hook_residual_edit_is_two_launches(monkeypatch):
    """The hook's own call (`_PatchState.edit_hidden`, which makes the BOS mask): encode kernel + fused edit,
    nothing else once the first call has made the per-length mask."""
    monkeypatch.setenv("SNCE_FAST_BACKEND", "triton")
    B, L, d, n, k = 2, 6, 24, 300, 17
    sae = make_sae(d, n, k)
    x = torch.randn(B, L, d, generator=torch.Generator().manual_seed(2))
    neurons = frequent_latents(x, sae)
    state = _patch_state(sae, neurons)
    first = state.edit_hidden(x)
    with _count(monkeypatch) as cnt:
        out = state.edit_hidden(x)
    assert cnt.triton == ["_encode_topk_kernel", "_edit_keys_kernel"] and cnt.aten == [], (cnt.triton, cnt.aten)
    want = reference.edit(x, sae, neurons, edit_mask=(torch.arange(L) >= 1).expand(B, L))
    assert torch.equal(out, first) and torch.equal(out[:, 0], x[:, 0]) and not torch.equal(out, x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eos", [None, 3])
def test_patch_hook_gated_edit_launches(monkeypatch, eos):
    """The gated hook call: encode + merge + `_edit_residual_kernel`, target activations (3 ops), the gate's
    counts (5) and the int8 mask cast; the BOS mask is neither rebuilt nor ANDed into a tensor of ones, and
    without an EOS id the counted tokens are the edit mask itself (with one, `counted_mask` adds its ops)."""
    monkeypatch.setenv("SNCE_FAST_BACKEND", "triton")
    B, L, d, n, k = 2, 6, 24, 300, 17
    sae = make_sae(d, n, k)
    x = torch.randn(B, L, d, generator=torch.Generator().manual_seed(3))
    neurons = frequent_latents(x, sae)
    state = _patch_state(sae, neurons, gate=True)
    state.eos_token_id = eos
    ids = torch.tensor([[0, 5, 6, 3, 3, 3], [0, 5, 6, 7, 8, 3]])
    state.input_ids = ids
    state.edit_hidden(x)
    with _count(monkeypatch) as cnt:
        out = state.edit_hidden(x)
    gate_ops = ["eq", "mul", "sum", "gt", "any", "bitwise_and", "sum", "ge", "bitwise_and", "_to_copy"]
    assert cnt.triton == ["_encode_topk_kernel", "_merge_topk_kernel", "_edit_residual_kernel"], cnt.triton
    assert (cnt.aten == gate_ops) if eos is None else (cnt.aten[-len(gate_ops):] == gate_ops), cnt.aten
    from snce_fast.hooks.activations import counted_mask

    want = reference.edit(x, sae, neurons, gate=True, edit_mask=(torch.arange(L) >= 1).expand(B, L),
                          count_mask=counted_mask(ids, None, eos))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_threshold_path_is_three_launches(monkeypatch):
    """The opt-in threshold selection (docs/kernels.md): sampling, filter, tail; the patch's residual edit (BOS mask
    as a stride-0 expand) the same three, the tail fused into the edit. No memset: the tickets stay zeroed."""
    monkeypatch.setattr(encode_mod, "SELECT", "threshold")
    B, L, d, n, k = 2, 6, 24, 300, 17
    sae = make_sae(d, n, k)
    x = torch.randn(B, L, d, generator=torch.Generator().manual_seed(1))
    kernels.encode(x, sae)
    with _count(monkeypatch) as cnt:
        kernels.encode(x, sae)
    assert cnt.triton == ["_threshold_kernel", "_filter_kernel", "_select_topk_kernel"] and cnt.aten == [], (
        cnt.triton, cnt.aten)
    neurons = frequent_latents(x, sae)
    edit_mask = (torch.arange(L) >= 1).expand(B, L)
    kernels.edit(x, sae, neurons, edit_mask=edit_mask)
    with _count(monkeypatch) as cnt:
        out = kernels.edit(x, sae, neurons, edit_mask=edit_mask)
    assert cnt.triton == ["_threshold_kernel", "_filter_kernel", "_select_edit_kernel"] and cnt.aten == [], (
        cnt.triton, cnt.aten)
    torch.testing.assert_close(out, reference.edit(x, sae, neurons, edit_mask=edit_mask), rtol=1e-5, atol=1e-5)

"""The interpreter bounds checker (tests/interpreter_bounds.py) that guards every kernel test."""
import pytest
import torch

import interpreter_bounds
from interpreter_bounds import OutOfBounds

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _copy(src, dst, n, extra, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n + extra, other=0.0)
    tl.store(dst + offs, v, mask=offs < n)


@triton.jit
def _store_past(dst, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.full([BLOCK], 1.0, tl.float32), mask=offs <= n)


@pytest.fixture(autouse=True)
def _checker_on(triton_on_cpu):
    if not interpreter_bounds.enabled():
        pytest.skip("the bounds checker could not hook this triton's interpreter (see the session warning)")


def test_in_bounds_masked_access_passes(triton_on_cpu):
    src = torch.arange(10, dtype=torch.float32)
    dst = torch.zeros(10)
    _copy[(1,)](src, dst, 10, 0, BLOCK=16)
    assert torch.equal(dst, src)


def test_one_element_past_a_load_is_caught(triton_on_cpu):
    src, dst = torch.arange(10, dtype=torch.float32), torch.zeros(10)
    with pytest.raises(Exception, match="_copy: load of 4 B .* outside every tensor argument"):
        _copy[(1,)](src, dst, 10, 1, BLOCK=16)


def test_one_element_past_a_store_is_caught_before_it_writes(triton_on_cpu):
    buf = torch.zeros(12)
    view = buf[:10]
    with pytest.raises(Exception, match="_store_past: store") as e:
        _store_past[(1,)](view, 10, BLOCK=16)
    assert isinstance(e.value, OutOfBounds) or isinstance(e.value.__cause__, OutOfBounds)
    assert buf.sum() == 0  # nothing was written


def test_strided_views_span_only_their_elements(triton_on_cpu):
    base = torch.arange(20, dtype=torch.float32)
    src = base[2:12:2]  # 5 elements, spans base[2..10]
    dst = torch.zeros(5)
    _copy[(1,)](src.contiguous(), dst, 5, 0, BLOCK=8)
    assert torch.equal(dst, src)
    with pytest.raises(Exception, match="outside every tensor argument"):
        _copy[(1,)](base[:5], dst, 5, 1, BLOCK=8)

"""Per-call constants made once: tensors derived from SAE weights, and small index/threshold tensors.

An edit launched on a GPU would otherwise rebuild them on every text-encoder call: each
`torch.tensor(list, device="cuda")` is a host-to-device copy from pageable memory (a few
microseconds against a kernel budget of tens, and not allowed while a CUDA graph is being
captured), and each weight-derived tensor is a fresh kernel. Both caches are bypassed while
torch.compile traces (the graph then builds the tensors itself).

CUDA graphs: a graph keeps raw pointers to every cached tensor a captured call used, so such
tensors are pinned (never evicted or cleared) once handed out during a capture; a cache miss
during capture computes a weight-derived tensor inside the graph without storing it, and
refuses (naming the fix) for a constant, which would need a host-to-device copy.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch

_DERIVED: "OrderedDict[tuple, tuple]" = OrderedDict()
_CONSTANTS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_PINNED: dict[int, torch.Tensor] = {}  # id -> tensor used by a captured CUDA graph
_LOCK = threading.Lock()
DERIVED_ENTRIES = 16
CONSTANT_ENTRIES = 64


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _pin_if_capturing(t: torch.Tensor) -> torch.Tensor:
    if _capturing():
        _PINNED[id(t)] = t
    return t


def _state(t: torch.Tensor) -> tuple:
    # inference tensors have no version counter (and can only be written inside inference_mode):
    # like writes through `.data`, such writes need `clear()`
    version = -1 if t.is_inference() else t._version
    return (t.data_ptr(), version, t.device, t.dtype, tuple(t.shape))


def derived(sources: Sequence[torch.Tensor], key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`compute()`, cached for these very source tensors (checked through weak references, so a freed
    tensor whose memory another one reuses never hits) at their current storage and in-place version.
    Writes through `.data` (and in-place writes to inference tensors) bump no version: after those,
    call `clear()`."""
    if torch.compiler.is_compiling():
        return compute()
    slot = (tuple(id(t) for t in sources), key)
    state = tuple(_state(t) for t in sources)
    with _LOCK:
        hit = _DERIVED.get(slot)
        if hit is not None:
            refs, cached_state, value = hit
            if cached_state == state and all(r() is t for r, t in zip(refs, sources)):
                _DERIVED.move_to_end(slot)
                return _pin_if_capturing(value)
    if _capturing():  # computed by the graph itself on every replay; storing it would hand out unwritten memory
        return compute()
    value = compute()
    with _LOCK:
        _DERIVED[slot] = (tuple(weakref.ref(t) for t in sources), state, value)
        _DERIVED.move_to_end(slot)
        while len(_DERIVED) > DERIVED_ENTRIES:
            _DERIVED.popitem(last=False)
    return value


def constant(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small read-only tensor of `values` on `device`, made (copied to the device) once."""
    if torch.compiler.is_compiling():
        return torch.tensor(list(values), dtype=dtype, device=device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (tuple(values), dtype, device)
    with _LOCK:
        t = _CONSTANTS.get(key)
        if t is not None:
            _CONSTANTS.move_to_end(key)
            return _pin_if_capturing(t)
    if _capturing():
        raise RuntimeError(
            f"snce_fast: the constant {list(values)} ({dtype}) is not on {device} yet and cannot be copied "
            "there during CUDA graph capture: run the same call once before capturing (a warm-up)")
    t = torch.tensor(list(values), dtype=dtype, device=device)
    with _LOCK:
        _CONSTANTS[key] = t
        while len(_CONSTANTS) > CONSTANT_ENTRIES:
            _CONSTANTS.popitem(last=False)
    return t


def clear() -> None:
    """Forget every cached weight-derived tensor (needed only after writes through `.data`, or in-place
    writes to inference tensors). Constants do not depend on weights and stay; tensors a captured
    CUDA graph uses stay alive."""
    with _LOCK:
        _DERIVED.clear()

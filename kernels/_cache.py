"""Per-call constants made once: tensors derived from SAE weights, and small index/threshold tensors.

An edit launched on a GPU would otherwise rebuild them on every text-encoder call: each
`torch.tensor(list, device="cuda")` is a host-to-device copy from pageable memory (a few
microseconds against a kernel budget of tens, and not allowed while a CUDA graph is being
captured), and each weight-derived tensor is a fresh kernel. Both caches are bypassed while
torch.compile traces (the graph then builds the tensors itself, once).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch

_DERIVED: "OrderedDict[tuple, tuple]" = OrderedDict()
_CONSTANTS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
DERIVED_ENTRIES = 16
CONSTANT_ENTRIES = 64


def _state(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape))


def derived(sources: Sequence[torch.Tensor], key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`compute()`, cached for these very source tensors (checked through weak references, so a freed
    tensor whose memory another one reuses never hits) at their current storage and in-place version.
    Writes through `.data` do not bump a tensor's version: after those, call `clear()`."""
    if torch.compiler.is_compiling():
        return compute()
    slot = (tuple(id(t) for t in sources), key)
    state = tuple(_state(t) for t in sources)
    hit = _DERIVED.get(slot)
    if hit is not None:
        refs, cached_state, value = hit
        if cached_state == state and all(r() is t for r, t in zip(refs, sources)):
            _DERIVED.move_to_end(slot)
            return value
    value = compute()
    _DERIVED[slot] = (tuple(weakref.ref(t) for t in sources), state, value)
    _DERIVED.move_to_end(slot)
    while len(_DERIVED) > DERIVED_ENTRIES:
        _DERIVED.popitem(last=False)
    return value


def constant(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small read-only tensor of `values` on `device`, made (copied to the device) once."""
    if torch.compiler.is_compiling():
        return torch.tensor(list(values), dtype=dtype, device=device)
    key = (tuple(values), dtype, torch.device(device))
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.tensor(list(values), dtype=dtype, device=device)
        _CONSTANTS[key] = t
        while len(_CONSTANTS) > CONSTANT_ENTRIES:
            _CONSTANTS.popitem(last=False)
    else:
        _CONSTANTS.move_to_end(key)
    return t


def clear() -> None:
    """Forget every cached tensor (needed only after writing weights through `.data`)."""
    _DERIVED.clear()
    _CONSTANTS.clear()

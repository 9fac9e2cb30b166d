"""Register a Triton-launching function as a `snce_fast::` PyTorch op.

On a GPU: `torch.library.triton_op` (Inductor sees the kernels through `wrap_triton`
and can trace into them), or with `opaque=True` a `custom_op` there too. Under `TRITON_INTERPRET=1`, `triton.jit` returns an
InterpretedFunction that `wrap_triton` cannot trace, so the same function is registered
as an opaque `torch.library.custom_op` with the given fake instead; `opcheck` and
`torch.compile(fullgraph=True)` then work on CPU tensors too (the op stays one node).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch.library import triton_op

if not __name__.startswith("snce_fast."):  # see kernels/__init__.py: a second registration corrupts the first
    raise ImportError(f"{__name__} is snce_fast's kernels/ directory imported as a top-level package "
                      "(its parent directory is on sys.path); import snce_fast.kernels instead")

from ._tuning import interpreting  # noqa: E402


OPAQUE_OPS: set[str] = set()  # ops registered with opaque=True


def register_op(name: str, fake: Callable, opaque: bool = False) -> Callable[[Callable], Callable]:
    """`opaque`: a `custom_op` on a GPU too, for launches whose effects Inductor cannot analyse (inline PTX makes
    its mutation analysis assume that every argument is written, so torch.compile would copy them)."""
    def deco(fn: Callable) -> Callable:
        if opaque:
            OPAQUE_OPS.add(name)
        if interpreting() or opaque:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return triton_op(name, mutates_args=())(fn)

    return deco


def on_device_of(t: torch.Tensor) -> ContextManager:
    """Make t's GPU the current one for a launch: triton launches on the current device, so tensors
    on cuda:1 while cuda:0 is current would be read from the wrong GPU. A no-op in the common case
    and while compiling (Inductor emits its own device guard)."""
    if t.is_cuda and not torch.compiler.is_compiling() and t.device.index not in (None, torch.cuda.current_device()):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()

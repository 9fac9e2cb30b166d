"""Combine functions for `tl.reduce`, shared by the kernels.

Compiled (GPU): our own `@triton.jit` functions, imported under their own names, because
Inductor re-emits a user kernel's jit dependencies by name when it compiles a graph around
the op, and cannot re-emit triton's private `_elementwise_max` & co. (their bodies use
`core.`, which the emitted module does not import; an alias such as `_MAX` is not emitted
at all). Interpreted (`TRITON_INTERPRET=1`): triton's own functions, which the interpreter
recognises by identity and reduces vectorised instead of element by element.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._tuning import interpreting

if interpreting():
    from triton.language.standard import _elementwise_max as max_combine  # noqa: F401
    from triton.language.standard import _elementwise_min as min_combine  # noqa: F401
    from triton.language.standard import _sum_combine as sum_combine  # noqa: F401
else:
    @triton.jit
    def max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def min_combine(a, b):
        return tl.minimum(a, b)

    @triton.jit
    def sum_combine(a, b):
        return a + b

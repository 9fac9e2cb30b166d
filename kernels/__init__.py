"""Triton kernels for SNCE, installed as `snce_fast.kernels` (never a top-level module).

`available()` says whether they can run; the backend calls `encode`, `decode` and `edit`
with the semantics of `snce_fast.reference`.
"""
from __future__ import annotations


def available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    return False, "the fused Triton kernels are not implemented yet"

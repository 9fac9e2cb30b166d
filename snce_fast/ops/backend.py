"""One entry point per op that picks the implementation (docs/api.md).

Auto choice: the Triton kernels for CUDA tensors, the C++ extension for the CPU ops it
implements, the eager reference otherwise. `SNCE_FAST_BACKEND=reference|cpp|triton`
forces one (so the Triton path can run on CPU tensors under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from snce_fast.ops import _ext, reference

BACKENDS = ("reference", "cpp", "triton")
OPS = ("encode", "decode", "edit")


def forced_backend() -> Optional[str]:
    name = os.environ.get("SNCE_FAST_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"SNCE_FAST_BACKEND={name!r} is not a backend: expected one of {BACKENDS} or 'auto'")
    return name


def _triton_ops() -> tuple[Optional[Any], str]:
    try:
        from snce_fast import kernels  # optional (triton); installed from the top-level kernels/ directory
    except ImportError as e:
        return None, f"snce_fast.kernels could not be imported ({e})"
    ok, why = kernels.available()
    return (kernels if ok else None), why


def _cpp_ops() -> tuple[Optional[Any], str]:
    if _ext.load() is None:
        return None, _ext.load_error()
    from snce_fast.ops import cpp_ops  # imported only once the extension loaded: it registers fake kernels

    return cpp_ops, ""


def _cpp_has_cuda() -> bool:
    return bool(_ext.built_with_cuda())


def implementation(op: str, device: torch.device) -> tuple[str, Callable[..., Any]]:
    """(backend name, function) that will run `op` for tensors on `device`."""
    forced = forced_backend()
    if forced == "reference":
        return "reference", getattr(reference, op)
    if forced == "triton" or (forced is None and device.type == "cuda"):
        mod, why = _triton_ops()
        if mod is not None and hasattr(mod, op):
            return "triton", getattr(mod, op)
        if forced == "triton":
            raise RuntimeError(f"SNCE_FAST_BACKEND=triton but the Triton kernels are unavailable: {why or f'no {op} kernel'}")
    # the C++ extension serves CPU tensors, and CUDA tensors when it was built with its CUDA kernels
    # (sparse decode: csrc/sparse_decode_cuda.cu) and Triton is unavailable
    if forced == "cpp" or (forced is None and (device.type == "cpu" or (device.type == "cuda" and _cpp_has_cuda()))):
        mod, why = _cpp_ops()
        if mod is not None and hasattr(mod, op):
            return "cpp", getattr(mod, op)
        if forced == "cpp" and mod is None:
            raise RuntimeError(f"SNCE_FAST_BACKEND=cpp but the C++ extension is unavailable: {why}")
    return "reference", getattr(reference, op)


def encode(x: torch.Tensor, sae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("encode", x.device)[1](x, sae)


def decode(values: torch.Tensor, indices: torch.Tensor, sae: Any) -> torch.Tensor:
    return implementation("decode", values.device)[1](values, indices, sae)


def edit(x: torch.Tensor, sae: Any, neurons: Any, **kwargs: Any) -> torch.Tensor:
    return implementation("edit", x.device)[1](x, sae, neurons, **kwargs)

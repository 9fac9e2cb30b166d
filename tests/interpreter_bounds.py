"""A bounds checker for Triton's interpreter (TRITON_INTERPRET=1).

The interpreter loads and stores through raw host pointers without any bounds check, so a
kernel that touches memory outside its tensors silently reads garbage or corrupts the heap
(a later, unrelated segfault) on the CPU, and faults only on a GPU. `enable()` makes every
interpreted load and store check that each unmasked address lies inside the memory spanned
by one of the launch's tensor arguments, and raise `OutOfBounds` naming the kernel, the
program id and the first offending address otherwise. (An overrun that lands inside another
argument's span is not caught: which argument a pointer came from is not known here.)
"""
from __future__ import annotations

import numpy as np


class OutOfBounds(AssertionError):
    pass


_ranges: list[tuple[int, int, str]] = []  # (start, end, argument name) of the running launch
_kernel = [""]
_installed = [False]


def _span(t) -> tuple[int, int]:
    """[first byte, one past the last byte] a strided tensor can address."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check(kind: str, ptrs: np.ndarray, mask: np.ndarray, itemsize: int) -> None:
    from triton.runtime.interpreter import interpreter_builder

    p = np.asarray(ptrs, dtype=np.uint64)
    m = np.broadcast_to(np.asarray(mask, dtype=bool), p.shape)
    live = p[m].astype(np.int64) if p.size else p.astype(np.int64)
    if live.size == 0:
        return
    ok = np.zeros(live.shape, dtype=bool)
    for start, end, _ in _ranges:
        ok |= (live >= start) & (live + itemsize <= end)
    if not ok.all():
        bad = int(live[~ok][0])
        near = ", ".join(f"{name} [{s:#x}, {e:#x})" for s, e, name in _ranges)
        raise OutOfBounds(
            f"{_kernel[0]}: {kind} of {itemsize} B at {bad:#x} ({int((~ok).sum())} addresses) is outside "
            f"every tensor argument ({near}); program id {tuple(interpreter_builder.grid_idx)}")


def enable() -> bool:
    """Install the checks (idempotent); False when this triton's interpreter lacks the hooks used here.
    Needs TRITON_INTERPRET=1 before triton is imported."""
    if _installed[0]:
        return True
    from triton.runtime import interpreter as itp

    hooks = [(itp, "GridExecutor", "_init_args_hst"), (itp, "InterpreterBuilder", "create_masked_load"),
             (itp, "InterpreterBuilder", "create_masked_store"), (itp, "_get_np_dtype", None)]
    if not all(hasattr(getattr(m, cls, None), attr) if attr else hasattr(m, cls) for m, cls, attr in hooks):
        return False

    init_args = itp.GridExecutor._init_args_hst
    masked_load = itp.InterpreterBuilder.create_masked_load
    masked_store = itp.InterpreterBuilder.create_masked_store

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _ranges.clear()
        _kernel[0] = getattr(self.fn, "__name__", str(self.fn))
        named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
        for name, arg in named:
            if hasattr(arg, "data_ptr") and hasattr(arg, "stride"):
                s, e = _span(arg)
                _ranges.append((s, e, name))
        return args_hst, kwargs_hst

    def create_masked_load(self, ptrs, mask, *rest, **kw):
        itemsize = np.dtype(itp._get_np_dtype(ptrs.get_element_ty())).itemsize
        _check("load", ptrs.data, mask.data, itemsize)
        return masked_load(self, ptrs, mask, *rest, **kw)

    def create_masked_store(self, ptrs, value, mask, *rest, **kw):
        _check("store", ptrs.data, mask.data, np.asarray(value.data).dtype.itemsize)
        return masked_store(self, ptrs, value, mask, *rest, **kw)

    itp.GridExecutor._init_args_hst = _init_args_hst
    itp.InterpreterBuilder.create_masked_load = create_masked_load
    itp.InterpreterBuilder.create_masked_store = create_masked_store
    _installed[0] = True
    return True


def enabled() -> bool:
    return _installed[0]

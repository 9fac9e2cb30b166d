"""Loads the compiled extension `snce_fast._C`; the package works without it (slower)."""
from __future__ import annotations

import functools
import importlib
from typing import Optional

_ERROR = ""


@functools.lru_cache(maxsize=1)
def load():
    """The `snce_fast._C` module, or None if it was not built (see `load_error()`)."""
    global _ERROR
    try:  # importing registers the torch.ops.snce_fast ops
        module = importlib.import_module("snce_fast._C")
    except ImportError as e:
        _ERROR = (
            f"the C++ extension snce_fast._C is not available ({e}); the eager reference is used instead. "
            "Build it with `pip install --no-build-isolation -e .` from a source checkout."
        )
        return None
    return module


def load_error() -> str:
    load()
    return _ERROR


def built_with_cuda() -> Optional[bool]:
    mod = load()
    return None if mod is None else bool(mod.built_with_cuda())

"""`python -m snce_fast.info`: which backends were built and which one each device uses."""
from __future__ import annotations

import platform
import sys

import torch

from snce_fast import __version__
from snce_fast.ops import _ext, backend


def report() -> str:
    lines = [f"snce_fast {__version__}  torch {torch.__version__}  python {platform.python_version()}"]
    mod = _ext.load()
    if mod is None:
        lines.append(f"C++ extension: NOT BUILT - {_ext.load_error()}")
    else:
        lines.append(
            f"C++ extension: built (OpenMP: {'yes' if mod.built_with_openmp() else 'no'}, "
            f"CUDA kernels: {'yes' if mod.built_with_cuda() else 'no'})"
        )
    ok, why = backend._triton_ops()[0] is not None, backend._triton_ops()[1]
    try:
        import triton

        lines.append(f"Triton: {triton.__version__}; fused kernels {'available' if ok else 'unavailable: ' + why}")
    except ImportError:
        lines.append("Triton: not installed (GPU kernels unavailable)")
    lines.append(f"CUDA available: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    forced = backend.forced_backend()
    lines.append(f"SNCE_FAST_BACKEND: {forced or 'auto'}")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        picks = ", ".join(f"{op}={backend.implementation(op, torch.device(dev))[0]}" for op in backend.OPS)
        lines.append(f"  on {dev}: {picks}")
    return "\n".join(lines)


def main() -> None:
    sys.stdout.write(report() + "\n")


if __name__ == "__main__":
    main()

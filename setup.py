"""Build snce_fast and its C++/CUDA extension `snce_fast._C`.

The CPU kernels (OpenMP) are always built. The CUDA kernels are added when
`(torch.cuda.is_available() or FORCE_CUDA=1)` and a CUDA toolkit (CUDA_HOME) is found and
torch itself is a CUDA build; `SNCE_FAST_NO_CUDA=1` forces a CPU-only build.
`TORCH_CUDA_ARCH_LIST` is respected (H100/H200: "9.0").

Install with `pip install --no-build-isolation -e .`: the extension must be compiled
against the torch already installed; an isolated build would fetch another torch.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover
    sys.exit(
        "snce_fast needs torch installed before it is built: `pip install torch` first, then "
        "`pip install --no-build-isolation -e .` (see README)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("SNCE_FAST_NO_CUDA", "0") == "1":
        return False
    requested = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
    if not requested:
        return False
    if CUDA_HOME is None:
        print("snce_fast: no CUDA toolkit (CUDA_HOME) found; building the CPU extension only", file=sys.stderr)
        return False
    if torch.version.cuda is None:
        if os.environ.get("FORCE_CUDA", "0") == "1":
            sys.exit(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build: a CUDA extension cannot link against it")
        return False
    return True


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", pattern)))
    cpp_sources = rel("*.cpp")
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20"] + openmp
    if _want_cuda():
        return [
            CUDAExtension(
                "snce_fast._C",
                cpp_sources + rel("*.cu"),
                define_macros=[("SNCE_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
                extra_link_args=openmp,
            )
        ]
    return [CppExtension("snce_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)]


setup(
    packages=["snce_fast", "snce_fast.kernels"],
    package_dir={"snce_fast": "snce_fast", "snce_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

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

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover
    sys.exit(
        "snce_fast needs torch installed before it is built: `pip install torch` first, then "
        "`pip install --no-build-isolation -e .` (see README)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))

# torch is pinned in torch_requirement(); the rest is the same for every build
RUNTIME_REQUIREMENTS = [
    "transformers>=4.40",
    "huggingface_hub>=0.23",  # SAE.from_pretrained / push_to_hub (transformers needs it too)
    "safetensors>=0.4",
    "numpy>=1.24",
    "tqdm>=4.60",
    "matplotlib>=3.6",
]


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


def torch_requirement() -> str:
    """The torch release `_C` is compiled against (local labels such as +cpu or +cu130 dropped)."""
    return f"torch=={torch.__version__.split('+')[0]}"


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", pattern)))
    cpp_sources = rel("*.cpp")
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20", "-g0"] + openmp
    strip = ["-s"] if sys.platform.startswith("linux") else []  # no debug symbols in the shipped .so
    if _want_cuda():
        return [
            CUDAExtension(
                "snce_fast._C",
                cpp_sources + rel("*.cu"),
                define_macros=[("SNCE_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
                extra_link_args=openmp + strip,
            )
        ]
    return [CppExtension("snce_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                         extra_link_args=openmp + strip)]


# every subpackage of snce_fast/ ships; the Triton kernels live in the top-level kernels/ directory
# and are installed as snce_fast.kernels (never as a top-level `kernels`)
PACKAGES = find_packages(include=["snce_fast", "snce_fast.*"]) + ["snce_fast.kernels"]

setup(
    packages=PACKAGES,
    package_dir={"snce_fast": "snce_fast", "snce_fast.kernels": "kernels"},
    package_data={"snce_fast": ["py.typed"]},
    install_requires=[torch_requirement(), *RUNTIME_REQUIREMENTS],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

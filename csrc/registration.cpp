// Python module stub and schema of the snce_fast:: ops implemented in C++/CUDA.
// Each kernel file adds its own TORCH_LIBRARY_IMPL; schemas live here once.
#include <torch/extension.h>

TORCH_LIBRARY_FRAGMENT(snce_fast, m) {
  m.def("sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor b_dec) -> Tensor");
}

static bool built_with_cuda() {
#ifdef SNCE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

static bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "snce_fast C++/CUDA kernels; the ops live under torch.ops.snce_fast";
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
  m.def("built_with_openmp", &built_with_openmp, "whether the CPU kernels use OpenMP");
}

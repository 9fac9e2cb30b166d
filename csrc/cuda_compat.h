#pragma once
// Include first in every .cu file. A CPU-only torch wheel ships the c10/cuda headers but not
// the CMake-generated c10/cuda/impl/cuda_cmake_macros.h (it only sets C10_CUDA_BUILD_SHARED_LIBS);
// without this the `nvcc -c` compile check cannot run against it. A CUDA torch has the file,
// so nothing changes there. ATen/cuda/CUDAContext.h is avoided for the same reason: it pulls in
// cuSPARSE/cuBLAS/cuSOLVER headers an nvcc-only toolkit does not have.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// Sparse decode on the GPU: one block per token row, threads stride over d,
// opmath (float32 or double) accumulation. Used when the Triton kernels are not available.
#include <ATen/OpMathType.h>
#include "cuda_compat.h"

#include <torch/extension.h>

#include "checks.h"

namespace {

template <typename scalar_t>
__global__ void sparse_decode_kernel(const scalar_t* __restrict__ values,
                                     const int32_t* __restrict__ indices,
                                     const scalar_t* __restrict__ w_dec,
                                     const scalar_t* __restrict__ b_dec, scalar_t* __restrict__ out,
                                     int64_t K, int64_t D, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = blockIdx.x;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    acc_t acc = static_cast<acc_t>(b_dec[c]);
    for (int64_t i = 0; i < K; ++i) {
      const acc_t v = static_cast<acc_t>(values[m * K + i]);
      const int64_t row = indices[m * K + i];
      // like PyTorch's own index kernels: a device-side assert instead of a host sync (the CPU op checks on the host)
      CUDA_KERNEL_ASSERT(row >= 0 && row < N && "sparse_decode: index out of range [0, n_latents)");
      if (v != acc_t(0)) acc += v * static_cast<acc_t>(w_dec[row * D + c]);
    }
    out[m * D + c] = static_cast<scalar_t>(acc);
  }
}

at::Tensor sparse_decode_cuda(const at::Tensor& values, const at::Tensor& indices,
                              const at::Tensor& W_dec, const at::Tensor& b_dec) {
  check_sparse_decode_args(values, indices, W_dec, b_dec);
  const c10::cuda::CUDAGuard guard(values.device());
  const auto dtype = values.scalar_type();
  auto v = values.contiguous();
  auto idx = indices.contiguous();
  auto w = W_dec.to(dtype).contiguous();
  auto b = b_dec.to(dtype).contiguous();
  const int64_t M = v.size(0), K = v.size(1), D = w.size(1);
  auto out = at::empty({M, D}, v.options());
  if (M == 0) return out;
  const int threads = D >= 256 ? 256 : 128;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sparse_decode_cuda", [&] {
    sparse_decode_kernel<scalar_t><<<M, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        v.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), K, D, w.size(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(snce_fast, CUDA, m) { m.impl("sparse_decode", &sparse_decode_cuda); }

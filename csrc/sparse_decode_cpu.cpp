// Sparse decode on the CPU: out[m] = b_dec + sum_i values[m, i] * W_dec[indices[m, i]],
// accumulated in at::opmath_type (float32 for half/bf16/float), one row per OpenMP iteration.
#include <ATen/OpMathType.h>
#include <torch/extension.h>
#include <vector>

#include "checks.h"

namespace {

template <typename scalar_t>
void decode_rows(const scalar_t* values, const int32_t* indices, const scalar_t* w_dec,
                 const scalar_t* b_dec, scalar_t* out, int64_t M, int64_t K, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp parallel
  {
    std::vector<acc_t> acc(D);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < D; ++c) acc[c] = static_cast<acc_t>(b_dec[c]);
      for (int64_t i = 0; i < K; ++i) {
        const acc_t v = static_cast<acc_t>(values[m * K + i]);
        if (v == acc_t(0)) continue;
        const scalar_t* row = w_dec + static_cast<int64_t>(indices[m * K + i]) * D;
        for (int64_t c = 0; c < D; ++c) acc[c] += v * static_cast<acc_t>(row[c]);
      }
      for (int64_t c = 0; c < D; ++c) out[m * D + c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices,
                             const at::Tensor& W_dec, const at::Tensor& b_dec) {
  check_sparse_decode_args(values, indices, W_dec, b_dec);
  const int64_t n = W_dec.size(0);
  if (indices.numel() > 0) {
    const auto lo = indices.min().item<int32_t>(), hi = indices.max().item<int32_t>();
    TORCH_CHECK(lo >= 0 && hi < n, "indices must lie in [0, ", n, "), got [", lo, ", ", hi, "]");
  }
  const auto dtype = values.scalar_type();
  auto v = values.contiguous();
  auto idx = indices.contiguous();
  auto w = W_dec.to(dtype).contiguous();
  auto b = b_dec.to(dtype).contiguous();
  const int64_t M = v.size(0), K = v.size(1), D = w.size(1);
  auto out = at::empty({M, D}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sparse_decode_cpu", [&] {
    decode_rows<scalar_t>(v.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), w.data_ptr<scalar_t>(),
                          b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, K, D);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(snce_fast, CPU, m) { m.impl("sparse_decode", &sparse_decode_cpu); }

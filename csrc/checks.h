#pragma once
#include <torch/extension.h>

#define SNCE_CHECK_2D(t, name) TORCH_CHECK((t).dim() == 2, name " must be 2-D, got ", (t).dim(), "-D")
#define SNCE_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " is on ", (a).device(), " but " #b " is on ", (b).device())

// Shape/dtype checks shared by the CPU and CUDA sparse decode.
inline void check_sparse_decode_args(const at::Tensor& values, const at::Tensor& indices,
                                     const at::Tensor& W_dec, const at::Tensor& b_dec) {
  SNCE_CHECK_2D(values, "values");
  SNCE_CHECK_2D(W_dec, "W_dec");
  SNCE_CHECK_SAME_DEVICE(values, W_dec);
  TORCH_CHECK(values.sizes() == indices.sizes(), "values ", values.sizes(), " and indices ",
              indices.sizes(), " must have one shape");
  TORCH_CHECK(indices.scalar_type() == at::kInt, "indices must be int32, got ", indices.scalar_type());
  TORCH_CHECK(b_dec.dim() == 1 && b_dec.size(0) == W_dec.size(1), "b_dec must be [", W_dec.size(1), "]");
}

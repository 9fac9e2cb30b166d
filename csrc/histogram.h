#pragma once
// Argument checks shared by the CPU and CUDA histogram_update kernels.
#include <torch/extension.h>

#include "checks.h"

namespace snce {

struct HistogramDims {
  int64_t M, K, P, G, n;
};

inline void check_state(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (it is updated in place)");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but indices are on ", like.device());
}

// Shapes, dtypes and devices (no value checks: those need a host sync on CUDA).
inline HistogramDims check_histogram_args(const at::Tensor& indices, const at::Tensor& values,
                                          const at::Tensor& token_mask, const at::Tensor& prompt_of_token,
                                          const at::Tensor& group_of_prompt, const at::Tensor& prompts_fired,
                                          const at::Tensor& tokens_fired, const at::Tensor& act_sum,
                                          const at::Tensor& n_prompts, const at::Tensor& n_tokens) {
  SNCE_CHECK_2D(indices, "indices");
  TORCH_CHECK(indices.scalar_type() == at::kInt, "indices must be int32, got ", indices.scalar_type());
  TORCH_CHECK(values.sizes() == indices.sizes(), "values ", values.sizes(), " and indices ", indices.sizes(),
              " must have one shape [M, k]");
  TORCH_CHECK(values.is_floating_point(), "values must be floating point, got ", values.scalar_type());
  const int64_t M = indices.size(0), K = indices.size(1);
  TORCH_CHECK(token_mask.dim() == 1 && token_mask.size(0) == M, "token_mask must be [M=", M, "], got ",
              token_mask.sizes());
  TORCH_CHECK(token_mask.scalar_type() == at::kBool, "token_mask must be bool, got ", token_mask.scalar_type());
  TORCH_CHECK(prompt_of_token.dim() == 1 && prompt_of_token.size(0) == M, "prompt_of_token must be [M=", M,
              "], got ", prompt_of_token.sizes());
  TORCH_CHECK(prompt_of_token.scalar_type() == at::kLong, "prompt_of_token must be int64, got ",
              prompt_of_token.scalar_type());
  TORCH_CHECK(group_of_prompt.dim() == 1, "group_of_prompt must be 1-D [P], got ", group_of_prompt.sizes());
  TORCH_CHECK(group_of_prompt.scalar_type() == at::kLong, "group_of_prompt must be int64, got ",
              group_of_prompt.scalar_type());
  SNCE_CHECK_2D(prompts_fired, "prompts_fired");
  const int64_t G = prompts_fired.size(0), n = prompts_fired.size(1);
  TORCH_CHECK(tokens_fired.sizes() == prompts_fired.sizes() && act_sum.sizes() == prompts_fired.sizes(),
              "prompts_fired ", prompts_fired.sizes(), ", tokens_fired ", tokens_fired.sizes(), " and act_sum ",
              act_sum.sizes(), " must all be [G, n]");
  TORCH_CHECK(n_prompts.dim() == 1 && n_prompts.size(0) == G && n_tokens.dim() == 1 && n_tokens.size(0) == G,
              "n_prompts ", n_prompts.sizes(), " and n_tokens ", n_tokens.sizes(), " must be [G=", G, "]");
  TORCH_CHECK(n < (int64_t(1) << 31), "n_latents=", n, " does not fit int32 indices");
  for (const auto* t : {&values, &token_mask, &prompt_of_token, &group_of_prompt}) {
    TORCH_CHECK(t->device() == indices.device(), "all inputs must be on ", indices.device(), ", got one on ",
                t->device());
  }
  check_state(prompts_fired, "prompts_fired", at::kLong, indices);
  check_state(tokens_fired, "tokens_fired", at::kLong, indices);
  check_state(act_sum, "act_sum", at::kDouble, indices);
  check_state(n_prompts, "n_prompts", at::kLong, indices);
  check_state(n_tokens, "n_tokens", at::kLong, indices);
  return {M, K, group_of_prompt.size(0), G, n};
}

}  // namespace snce

// Schema of snce_fast::histogram_update (docs/method.md); kernels in histogram_cpu.cpp and
// histogram_cuda.cu. A latent fires on a token if it is in the token's top-k with value > threshold;
// only tokens with token_mask set count. All state tensors are updated in place.
#include <torch/extension.h>

TORCH_LIBRARY_FRAGMENT(snce_fast, m) {
  m.def(
      "histogram_update(Tensor indices, Tensor values, Tensor token_mask, Tensor prompt_of_token, "
      "Tensor group_of_prompt, Tensor(a!) prompts_fired, Tensor(b!) tokens_fired, Tensor(c!) act_sum, "
      "Tensor(d!) n_prompts, Tensor(e!) n_tokens, float threshold=0.0) -> ()");
}

// Streaming activation-frequency histograms on the GPU (docs/histograms.md).
//
// One thread per (token, slot) entry, 64-bit integer atomics for the counts (exact and
// deterministic whatever the order). act_sum (float64) is NOT summed with atomics, whose order
// changes the last bits from run to run: the entries kernel writes each entry's target cell
// (g * n + j, or a sentinel when it does not fire), a stable sort groups the entries of a cell in
// token order, and one thread per cell adds them in that order -- the order of the CPU op, so
// act_sum is bit-identical to the CPU's and run to run. A scratch bitmap of P x ceil(n/32) words,
// zeroed per call, de-duplicates latents per prompt: the one entry whose atomicOr sets a
// (prompt, latent) bit counts the prompt.
// No host synchronisation: out-of-range indices trip a device-side assert (in both kernels).
#include "cuda_compat.h"

#include <torch/extension.h>

#include "histogram.h"

namespace {

using ull = unsigned long long;
static_assert(sizeof(ull) == sizeof(int64_t), "int64 counters are updated as unsigned long long");

template <typename scalar_t>
__global__ void histogram_entries_kernel(const int32_t* __restrict__ idx, const scalar_t* __restrict__ val,
                                         const bool* __restrict__ mask, const int64_t* __restrict__ prompt_of,
                                         const int64_t* __restrict__ group_of, int64_t* prompts_fired,
                                         int64_t* tokens_fired, int64_t* cell, uint32_t* seen, int64_t M,
                                         int64_t K, int64_t P, int64_t G, int64_t n, int64_t words,
                                         double threshold) {
  const int64_t total = M * K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = e / K;
    cell[e] = G * n;  // sentinel: sorts after every cell, adds nothing
    const int64_t j = idx[e];  // checked for every entry, as the CPU op's host check does
    CUDA_KERNEL_ASSERT(j >= 0 && j < n && "histogram_update: an index is outside [0, n)");
    if (!mask[m]) continue;
    const double v = static_cast<double>(val[e]);
    if (!(v > threshold)) continue;
    const int64_t p = prompt_of[m];
    CUDA_KERNEL_ASSERT(p >= 0 && p < P && "histogram_update: prompt_of_token is outside [0, P)");
    const int64_t g = group_of[p];
    CUDA_KERNEL_ASSERT(g >= 0 && g < G && "histogram_update: group_of_prompt is outside [0, G)");
    const int64_t at = g * n + j;
    atomicAdd(reinterpret_cast<ull*>(tokens_fired + at), ull(1));
    cell[e] = at;
    const uint32_t bit = 1u << (j & 31);
    const uint32_t old = atomicOr(seen + p * words + (j >> 5), bit);
    if (!(old & bit)) atomicAdd(reinterpret_cast<ull*>(prompts_fired + at), ull(1));
  }
}

// act_sum[cell] += the values of its entries, in token order: `cell` is sorted (stably, so each cell's
// entries keep their (token, slot) order) and `order` maps sorted positions to entries; the thread at
// the first position of a cell's run adds the whole run sequentially, as the CPU op does.
template <typename scalar_t>
__global__ void act_sum_runs_kernel(const int64_t* __restrict__ cell, const int64_t* __restrict__ order,
                                    const scalar_t* __restrict__ val, double* act_sum, int64_t total,
                                    int64_t end) {
  for (int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; s < total;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = cell[s];
    if (c >= end || (s > 0 && cell[s - 1] == c)) continue;
    double acc = act_sum[c];
    for (int64_t t = s; t < total && cell[t] == c; ++t) acc += static_cast<double>(val[order[t]]);
    act_sum[c] = acc;
  }
}

__global__ void histogram_totals_kernel(const bool* __restrict__ mask, const int64_t* __restrict__ prompt_of,
                                        const int64_t* __restrict__ group_of, int64_t* n_prompts,
                                        int64_t* n_tokens, int64_t M, int64_t P, int64_t G) {
  const int64_t total = M > P ? M : P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < P) {
      const int64_t g = group_of[i];
      CUDA_KERNEL_ASSERT(g >= 0 && g < G && "histogram_update: group_of_prompt is outside [0, G)");
      atomicAdd(reinterpret_cast<ull*>(n_prompts + g), ull(1));
    }
    if (i < M) {  // every token's prompt is checked, as the CPU op's host check does
      const int64_t p = prompt_of[i];
      CUDA_KERNEL_ASSERT(p >= 0 && p < P && "histogram_update: prompt_of_token is outside [0, P)");
      if (mask[i]) {
        const int64_t g = group_of[p];
        CUDA_KERNEL_ASSERT(g >= 0 && g < G && "histogram_update: group_of_prompt is outside [0, G)");
        atomicAdd(reinterpret_cast<ull*>(n_tokens + g), ull(1));
      }
    }
  }
}

int blocks_for(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return static_cast<int>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

void histogram_update_cuda(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& token_mask,
                           const at::Tensor& prompt_of_token, const at::Tensor& group_of_prompt,
                           at::Tensor& prompts_fired, at::Tensor& tokens_fired, at::Tensor& act_sum,
                           at::Tensor& n_prompts, at::Tensor& n_tokens, double threshold) {
  const auto d = snce::check_histogram_args(indices, values, token_mask, prompt_of_token, group_of_prompt,
                                            prompts_fired, tokens_fired, act_sum, n_prompts, n_tokens);
  const c10::cuda::CUDAGuard guard(indices.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto idx = indices.contiguous();
  auto val = values.contiguous();
  auto mask = token_mask.contiguous();
  auto pot = prompt_of_token.contiguous();
  auto gop = group_of_prompt.contiguous();
  constexpr int threads = 256;
  if (d.M > 0 || d.P > 0) {
    histogram_totals_kernel<<<blocks_for(d.M > d.P ? d.M : d.P, threads), threads, 0, stream>>>(
        mask.data_ptr<bool>(), pot.data_ptr<int64_t>(), gop.data_ptr<int64_t>(), n_prompts.data_ptr<int64_t>(),
        n_tokens.data_ptr<int64_t>(), d.M, d.P, d.G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (d.M == 0 || d.K == 0) return;
  const int64_t words = (d.n + 31) / 32;
  auto seen = at::zeros({d.P * words}, indices.options().dtype(at::kInt));  // stream-ordered scratch
  auto cell = at::empty({d.M * d.K}, indices.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(), "histogram_update_cuda", [&] {
    histogram_entries_kernel<scalar_t><<<blocks_for(d.M * d.K, threads), threads, 0, stream>>>(
        idx.data_ptr<int32_t>(), val.data_ptr<scalar_t>(), mask.data_ptr<bool>(), pot.data_ptr<int64_t>(),
        gop.data_ptr<int64_t>(), prompts_fired.data_ptr<int64_t>(), tokens_fired.data_ptr<int64_t>(),
        cell.data_ptr<int64_t>(), reinterpret_cast<uint32_t*>(seen.data_ptr<int32_t>()), d.M, d.K, d.P, d.G, d.n,
        words, threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // stable: the entries of one cell keep their (token, slot) order, the CPU op's summation order
    auto sorted = at::sort(cell, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor& cells = std::get<0>(sorted);
    const at::Tensor& order = std::get<1>(sorted);
    act_sum_runs_kernel<scalar_t><<<blocks_for(d.M * d.K, threads), threads, 0, stream>>>(
        cells.data_ptr<int64_t>(), order.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), act_sum.data_ptr<double>(),
        d.M * d.K, d.G * d.n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(snce_fast, CUDA, m) { m.impl("histogram_update", &histogram_update_cuda); }

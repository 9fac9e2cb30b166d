// Streaming activation-frequency histograms on the CPU (docs/method.md).
//
// Each OpenMP thread owns a disjoint, 64-aligned range of latents (its private slice of the
// [G, n] counters) and scans every (token, slot) entry, updating only its own latents. So there
// are no atomics and no merge step, and every counter -- act_sum's float64 sums included -- is
// accumulated in token order: the result does not depend on the thread count.
// prompts_fired counts a latent at most once per prompt (see StampDedup / BitmapDedup).
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "histogram.h"

namespace {

// Counts a latent once per prompt. Prompts laid out contiguously (the scan's [P, L] batches) use a
// stamp per latent (the last prompt that counted it, 4 bytes a latent); any other layout uses a
// bitmap of one bit per (prompt, latent). Either way a thread touches only its own latents' words.
struct StampDedup {
  std::vector<int32_t> last;
  StampDedup(int64_t, int64_t n) : last(static_cast<size_t>(n), -1) {}
  bool first(int64_t p, int64_t j) {
    if (last[j] == p) return false;
    last[j] = static_cast<int32_t>(p);
    return true;
  }
};

struct BitmapDedup {
  int64_t words;
  std::vector<uint64_t> bits;
  BitmapDedup(int64_t P, int64_t n) : words((n + 63) / 64), bits(static_cast<size_t>(P * ((n + 63) / 64)), 0) {}
  bool first(int64_t p, int64_t j) {
    uint64_t& w = bits[p * words + (j >> 6)];
    const uint64_t bit = uint64_t(1) << (j & 63);
    if (w & bit) return false;
    w |= bit;
    return true;
  }
};

template <typename scalar_t, typename Dedup>
void update_entries(const int32_t* idx, const scalar_t* val, const bool* mask, const int64_t* prompt_of,
                    const int64_t* group_of, int64_t* prompts_fired, int64_t* tokens_fired, double* act_sum,
                    const snce::HistogramDims& d, double threshold) {
  const int64_t words = (d.n + 63) / 64;  // latents are split among threads in 64-latent words
  Dedup dedup(d.P, d.n);
#pragma omp parallel
  {
    int64_t t = 0, T = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    T = omp_get_num_threads();
#endif
    const int64_t w0 = words * t / T, w1 = words * (t + 1) / T;
    const int64_t j0 = w0 * 64, span = std::min(w1 * 64, d.n) - j0;
    if (span > 0) {
      for (int64_t m = 0; m < d.M; ++m) {
        if (!mask[m]) continue;
        const int64_t p = prompt_of[m];
        const int64_t row = group_of[p] * d.n;
        for (int64_t i = 0; i < d.K; ++i) {
          const int64_t j = idx[m * d.K + i];
          if (static_cast<uint64_t>(j - j0) >= static_cast<uint64_t>(span)) continue;
          const double v = static_cast<double>(val[m * d.K + i]);
          if (!(v > threshold)) continue;
          tokens_fired[row + j] += 1;
          act_sum[row + j] += v;
          if (dedup.first(p, j)) prompts_fired[row + j] += 1;
        }
      }
    }
  }
}

bool contiguous_prompts(const int64_t* prompt_of, int64_t M, int64_t P) {
  // every prompt's tokens form one run: runs start where the prompt id changes; P ids -> <= P runs, all distinct
  std::vector<bool> started(static_cast<size_t>(P), false);
  for (int64_t m = 0; m < M; ++m) {
    if (m > 0 && prompt_of[m] == prompt_of[m - 1]) continue;
    if (started[prompt_of[m]]) return false;
    started[prompt_of[m]] = true;
  }
  return true;
}

void check_range(const at::Tensor& t, int64_t hi, const char* name, const char* what) {
  if (t.numel() == 0) return;
  const int64_t lo_v = t.min().item<int64_t>(), hi_v = t.max().item<int64_t>();
  TORCH_CHECK(lo_v >= 0 && hi_v < hi, name, " must lie in [0, ", hi, ") (", what, "), got values in [", lo_v, ", ",
              hi_v, "]");
}

void histogram_update_cpu(const at::Tensor& indices, const at::Tensor& values, const at::Tensor& token_mask,
                          const at::Tensor& prompt_of_token, const at::Tensor& group_of_prompt,
                          at::Tensor& prompts_fired, at::Tensor& tokens_fired, at::Tensor& act_sum,
                          at::Tensor& n_prompts, at::Tensor& n_tokens, double threshold) {
  const auto d = snce::check_histogram_args(indices, values, token_mask, prompt_of_token, group_of_prompt,
                                            prompts_fired, tokens_fired, act_sum, n_prompts, n_tokens);
  check_range(indices, d.n, "indices", "the latents of prompts_fired [G, n]");
  check_range(prompt_of_token, d.P, "prompt_of_token", "one entry of group_of_prompt per prompt");
  check_range(group_of_prompt, d.G, "group_of_prompt", "the rows of prompts_fired [G, n]");
  auto idx = indices.contiguous();
  auto val = values.contiguous();
  auto mask = token_mask.contiguous();
  auto pot = prompt_of_token.contiguous();
  auto gop = group_of_prompt.contiguous();
  const int64_t* prompt_of = pot.data_ptr<int64_t>();
  const int64_t* group_of = gop.data_ptr<int64_t>();
  const bool* m = mask.data_ptr<bool>();
  int64_t* np = n_prompts.data_ptr<int64_t>();
  int64_t* nt = n_tokens.data_ptr<int64_t>();
  for (int64_t p = 0; p < d.P; ++p) np[group_of[p]] += 1;
  for (int64_t i = 0; i < d.M; ++i) nt[group_of[prompt_of[i]]] += m[i] ? 1 : 0;
  if (d.M == 0 || d.K == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, val.scalar_type(), "histogram_update_cpu", [&] {
    auto run = [&](auto* tag) {
      using Dedup = std::remove_pointer_t<decltype(tag)>;
      update_entries<scalar_t, Dedup>(idx.data_ptr<int32_t>(), val.data_ptr<scalar_t>(), m, prompt_of, group_of,
                                      prompts_fired.data_ptr<int64_t>(), tokens_fired.data_ptr<int64_t>(),
                                      act_sum.data_ptr<double>(), d, threshold);
    };
    if (contiguous_prompts(prompt_of, d.M, d.P)) {
      run(static_cast<StampDedup*>(nullptr));
    } else {
      run(static_cast<BitmapDedup*>(nullptr));
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(snce_fast, CPU, m) { m.impl("histogram_update", &histogram_update_cpu); }

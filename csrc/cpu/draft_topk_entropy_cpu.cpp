// CPU kernel of draft_topk_entropy: one pass over each row, rows in parallel.
//
// A row is read in L1-sized tiles. Each tile is converted and scaled once into
// a float buffer, then (1) its max and NaN/+inf flag are taken, (2) it is
// scanned for top-k candidates only if its max can beat the current k-th
// entry, and (3) exp(z - m) and exp(z - m) * (z - m) are summed in float lanes
// with a vectorisable exp, then folded into the row's double-precision
// core::EntropyState (which rescales when the running max grows). The kernel
// is instantiated with 4 float lanes (cpu/simd.h; the portable baseline) and,
// on x86-64 CPUs with AVX2 + FMA, with 8 lanes inside a target("avx2,fma")
// function chosen at run time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "core/draft_topk_entropy.h"
#include "cpu/simd.h"
#include "draft_topk_entropy_checks.h"

namespace heterospec {
namespace {

using cpu::Simd;
using core::EntropyState;
using core::TopKEntry;

// Elements per tile: the float buffer (4 KiB) stays in L1 between the passes.
constexpr int64_t kTile = 1024;
constexpr int kMaxLanes = 8;
static_assert(kTile % kMaxLanes == 0, "a tile must hold whole vectors");

// Reads row[begin, begin + len) divided by the temperature into tile[0, len),
// padded up to whole vectors with -inf (probability 0, and never a top-k
// candidate because the candidate scan stops at len).
template <typename scalar_t, int Lanes>
HX_CPU_ALWAYS_INLINE void load_tile(const scalar_t* row, int64_t col_stride, int64_t begin,
                                    int64_t len, float temperature, float* tile) {
  if (col_stride == 1) {
    const scalar_t* src = row + begin;
    for (int64_t i = 0; i < len; ++i) tile[i] = static_cast<float>(src[i]) / temperature;
  } else {
    const scalar_t* src = row + begin * col_stride;
    for (int64_t i = 0; i < len; ++i) {
      tile[i] = static_cast<float>(src[i * col_stride]) / temperature;
    }
  }
  const int64_t padded = (len + Lanes - 1) / Lanes * Lanes;
  for (int64_t i = len; i < padded; ++i) tile[i] = -std::numeric_limits<float>::infinity();
}

// One row: fills list[0, k) (sorted, ties to the lowest id) and returns the
// row's entropy state (invalid on the first NaN / +inf tile).
template <typename scalar_t, int Lanes>
HX_CPU_ALWAYS_INLINE EntropyState<double> process_row_impl(const scalar_t* row, int64_t vocab,
                                                           int64_t col_stride, float temperature,
                                                           int k, TopKEntry* list, float* tile) {
  using V = Simd<Lanes>;
  using F = typename V::F;
  using I = typename V::I;
  EntropyState<double> state = EntropyState<double>::empty();
  for (int i = 0; i < k; ++i) list[i] = core::topk_pad();
  const F finite_max = V::splat(std::numeric_limits<float>::max());

  for (int64_t begin = 0; begin < vocab; begin += kTile) {
    const int64_t len = std::min(kTile, vocab - begin);
    const int64_t padded = (len + Lanes - 1) / Lanes * Lanes;
    load_tile<scalar_t, Lanes>(row, col_stride, begin, len, temperature, tile);

    // Pass 1: tile max, and NaN / +inf detection (!(z <= FLT_MAX)).
    F vmax = V::splat(-std::numeric_limits<float>::infinity());
    I bad = I{};
    for (int64_t i = 0; i < padded; i += Lanes) {
      const F z = V::load(tile + i);
      vmax = z > vmax ? z : vmax;
      bad |= ~(z <= finite_max);
    }
    if (V::any(bad)) {
      state.invalid = true;
      return state;
    }
    const float tile_max = V::horizontal_max(vmax);

    // Pass 2: top-k candidates, only when the tile can change the list. Ids
    // grow along the row, so a value equal to a real k-th entry can never
    // displace it, while a padding k-th slot takes anything (-inf included).
    if (tile_max > list[k - 1].value || list[k - 1].id == core::kTopKPadId) {
      for (int64_t i = 0; i < len; ++i) {
        const float z = tile[i];
        if (z > list[k - 1].value || list[k - 1].id == core::kTopKPadId) {
          core::topk_insert(list, k, TopKEntry{z, static_cast<int32_t>(begin + i)});
        }
      }
    }

    // Pass 3: softmax sums relative to the running max, in float lanes per
    // tile and in double across tiles.
    if (tile_max == -std::numeric_limits<float>::infinity()) continue;
    state.rescale_to(static_cast<double>(tile_max));
    const F m = V::splat(static_cast<float>(state.max));
    F sum = F{};
    F shifted = F{};
    for (int64_t i = 0; i < padded; i += Lanes) {
      F d_clamped;
      const F e = V::exp_nonpositive(V::load(tile + i) - m, &d_clamped);
      sum += e;
      shifted += e * d_clamped;
    }
    state.sum += V::horizontal_sum(sum);
    state.shifted += V::horizontal_sum(shifted);
  }
  return state;
}

template <typename scalar_t>
EntropyState<double> process_row_portable(const scalar_t* row, int64_t vocab,
                                          int64_t col_stride, float temperature, int k,
                                          TopKEntry* list, float* tile) {
  return process_row_impl<scalar_t, 4>(row, vocab, col_stride, temperature, k, list, tile);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HX_TOPK_HAVE_AVX2_PATH 1
template <typename scalar_t>
__attribute__((target("avx2,fma"))) EntropyState<double> process_row_avx2(
    const scalar_t* row, int64_t vocab, int64_t col_stride, float temperature, int k,
    TopKEntry* list, float* tile) {
  return process_row_impl<scalar_t, 8>(row, vocab, col_stride, temperature, k, list, tile);
}

// HETEROSPEC_CPU_PORTABLE=1 forces the 4-lane path so tests can cover it on
// AVX2 machines.
bool use_avx2_path() {
  static const bool use = [] {
    const char* force = std::getenv("HETEROSPEC_CPU_PORTABLE");
    if (force != nullptr && force[0] != '\0' && force[0] != '0') return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
}
#endif

enum class RowStatus : uint8_t { kOk = 0, kNonFinite = 1, kAllNegInf = 2 };

struct Outputs {
  float* topk_logprobs;
  int64_t* topk_ids;
  float* topk_entropy;
  float* entropy;
  float* logsumexp;
};

template <typename scalar_t>
void run_rows(const at::Tensor& logits, int k, float temperature, const Outputs& out,
              std::vector<RowStatus>& status) {
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const int64_t row_stride = logits.stride(0);
  const int64_t col_stride = logits.stride(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  // Aim for >= ~64k elements per task so small-V batches are not all overhead.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(vocab, 1));
  at::parallel_for(0, rows, grain, [&](int64_t row_begin, int64_t row_end) {
    alignas(64) float tile[kTile];
    TopKEntry list[core::kMaxTopK];
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = base + r * row_stride;
#ifdef HX_TOPK_HAVE_AVX2_PATH
      const EntropyState<double> state =
          use_avx2_path()
              ? process_row_avx2(row, vocab, col_stride, temperature, k, list, tile)
              : process_row_portable(row, vocab, col_stride, temperature, k, list, tile);
#else
      const EntropyState<double> state =
          process_row_portable(row, vocab, col_stride, temperature, k, list, tile);
#endif
      if (!state.valid()) {
        status[r] = state.invalid ? RowStatus::kNonFinite : RowStatus::kAllNegInf;
        continue;
      }
      const double log_sum = std::log(state.sum);
      out.logsumexp[r] = static_cast<float>(state.max + log_sum);
      out.entropy[r] = static_cast<float>(state.entropy());
      out.topk_entropy[r] = static_cast<float>(core::topk_renormalised_entropy<double>(list, k));
      for (int i = 0; i < k; ++i) {
        // (z - max) - log S, as on CUDA: z - logsumexp would lose every digit
        // below the ulp of a huge logsumexp (z = [3e30, 3e30] gives 0, not -ln 2).
        const double shifted = static_cast<double>(list[i].value) - state.max;
        out.topk_logprobs[r * k + i] = static_cast<float>(shifted - log_sum);
        out.topk_ids[r * k + i] = list[i].id;
      }
    }
  });
}

void draft_topk_entropy_out_cpu(const at::Tensor& logits, int64_t k, double temperature,
                                at::Tensor& topk_logprobs, at::Tensor& topk_ids,
                                at::Tensor& topk_entropy, at::Tensor& entropy,
                                at::Tensor& logsumexp) {
  const float temperature_f = check_draft_topk_entropy_out_args(
      logits, k, temperature, c10::DeviceType::CPU, topk_logprobs, topk_ids, topk_entropy, entropy,
      logsumexp);
  const int64_t rows = logits.size(0);
  if (rows == 0) return;
  const Outputs out{topk_logprobs.data_ptr<float>(), topk_ids.data_ptr<int64_t>(),
                    topk_entropy.data_ptr<float>(), entropy.data_ptr<float>(),
                    logsumexp.data_ptr<float>()};
  std::vector<RowStatus> status(rows, RowStatus::kOk);
  const int k_int = static_cast<int>(k);
  switch (logits.scalar_type()) {
    case at::kFloat:
      run_rows<float>(logits, k_int, temperature_f, out, status);
      break;
    case at::kHalf:
      run_rows<c10::Half>(logits, k_int, temperature_f, out, status);
      break;
    case at::kBFloat16:
      run_rows<c10::BFloat16>(logits, k_int, temperature_f, out, status);
      break;
    default:
      TORCH_CHECK(false, "logits must be float32, float16 or bfloat16, got ",
                  logits.scalar_type());
  }
  for (int64_t r = 0; r < rows; ++r) {
    HX_CHECK_VALUE(status[r] == RowStatus::kOk, "logits row ", r, " is invalid: it ",
                   status[r] == RowStatus::kNonFinite
                       ? "holds a NaN or +inf (after dividing by the temperature)"
                       : "has no finite value (all -inf)");
  }
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CPU, m) {
  m.impl("draft_topk_entropy",
         &heterospec::draft_topk_entropy_functional<heterospec::draft_topk_entropy_out_cpu>);
  m.impl("draft_topk_entropy_out", &heterospec::draft_topk_entropy_out_cpu);
}

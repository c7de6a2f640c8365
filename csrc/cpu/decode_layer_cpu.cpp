// CPU kernels of the decode-layer ops: the small steps between the GEMMs of a
// Llama-style decoder layer (an EAGLE-3 draft head's layer) at decode sizes,
// each fused into one pass over its rows.
//
// Why: at a handful of rows each of these steps is tens of kilobytes of data,
// but as torch compositions they are 30-odd ops per layer, each paying its
// dispatch and running cache-cold right after a GEMM has streamed megabytes of
// weights (bench/RESULTS.md, "Where a draft level's time goes"). One kernel per
// step removes the per-op cost; the arithmetic stays float32.
//
// Rounding points follow the torch composition the driver used before: norms
// and SiLU in float32 and one rounding to the output dtype; RoPE in float32,
// q and k rounded to the cache dtype before the dot products (as they were
// when written to, and read back from, a bfloat16 cache); softmax and the
// weighted sum of values in float32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/simd.h"
#include "decode_layer_checks.h"

namespace heterospec {
namespace {

// The attention and SiLU loops run as target_clones (AVX-512, AVX2 and the
// baseline, chosen once at load time): the package is built for the baseline
// x86-64, where the 8-lane vectors of cpu/simd.h are split in two.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HX_CPU_CLONES
#endif

constexpr int kLanes = 8;
using cpu_attention::kMaxGroup;
using Vec = cpu::Simd<kLanes>;

HX_CPU_ALWAYS_INLINE float to_float(float x) { return x; }
HX_CPU_ALWAYS_INLINE float to_float(c10::BFloat16 x) {
  return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16);
}

// float -> T with round-to-nearest-even (NaN stays a quiet NaN), as
// Tensor.to(torch.bfloat16) rounds; written branch-free so loops vectorise.
template <typename T>
HX_CPU_ALWAYS_INLINE T from_float(float x);
template <>
HX_CPU_ALWAYS_INLINE float from_float<float>(float x) { return x; }
template <>
HX_CPU_ALWAYS_INLINE c10::BFloat16 from_float<c10::BFloat16>(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded),
                       c10::BFloat16::from_bits());
}

// n rounded up to whole Vec vectors.
inline int64_t whole_vectors(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Rows per parallel_for task for row-wise kernels of `width` columns: a task
// takes about 64 K elements, so a decode-size call stays on one thread.
inline int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, width));
}

void check_eps(double eps) {
  HX_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ",
                 hx_value(eps));
}

// out[d] = x[d] / sqrt(mean(x^2) + eps) * weight[d], in float32.
template <typename In, typename Out>
HX_CPU_ALWAYS_INLINE void rms_norm_row(const In* x, const float* weight, float eps,
                                       int64_t width, Out* out) {
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t d = 0; d < width; ++d) {
    const float v = to_float(x[d]);
    squares += v * v;
  }
  const float inv = 1.0f / std::sqrt(squares / static_cast<float>(width) + eps);
#pragma omp simd
  for (int64_t d = 0; d < width; ++d) out[d] = from_float<Out>(to_float(x[d]) * inv * weight[d]);
}

// Calls fn(T{}) with T the C++ type of an activation dtype (float32 or bfloat16).
template <typename Fn>
void with_activation_type(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kBFloat16) {
    fn(c10::BFloat16());
  } else {
    fn(float());
  }
}

// ----------------------------------------------------------------- embed_hidden_rms_norm

at::Tensor embed_hidden_rms_norm_cpu(const at::Tensor& token_ids_in, const at::Tensor& embed_in,
                                     const at::Tensor& hidden_in,
                                     const at::Tensor& embed_weight_in,
                                     const at::Tensor& hidden_weight_in, double eps) {
  check_embed_hidden_rms_norm_args(token_ids_in, embed_in, hidden_in, embed_weight_in,
                                   hidden_weight_in);
  check_eps(eps);
  const at::Tensor token_ids = token_ids_in.contiguous();
  const at::Tensor embed = embed_in.contiguous();
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor embed_weight = embed_weight_in.contiguous();
  const at::Tensor hidden_weight = hidden_weight_in.contiguous();
  const int64_t n = token_ids.size(0);
  const int64_t vocab = embed.size(0);
  const int64_t width = embed.size(1);
  const int64_t* ids = token_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    HX_CHECK_VALUE(ids[i] >= 0 && ids[i] < vocab, "token_ids[", i, "] = ", ids[i],
                   " is not a row of embed (", vocab, " rows)");
  }
  at::Tensor out = at::empty({n, 2 * width}, embed.options());
  const float* ew = embed_weight.data_ptr<float>();
  const float* hw = hidden_weight.data_ptr<float>();
  const float e = static_cast<float>(eps);
  with_activation_type(embed.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    const T* table = embed.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    const bool hidden_float = hidden.scalar_type() == at::kFloat;
    at::parallel_for(0, n, row_grain(2 * width), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* row = dst + i * 2 * width;
        rms_norm_row(table + ids[i] * width, ew, e, width, row);
        if (hidden_float) {
          rms_norm_row(hidden.data_ptr<float>() + i * width, hw, e, width, row + width);
        } else {
          rms_norm_row(hidden.data_ptr<T>() + i * width, hw, e, width, row + width);
        }
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------- fused_add_rms_norm

at::Tensor fused_add_rms_norm_cpu(at::Tensor& residual, const at::Tensor& delta_in,
                                  const at::Tensor& weight_in, double eps) {
  check_fused_add_rms_norm_args(residual, delta_in, weight_in);
  check_eps(eps);
  const at::Tensor delta = delta_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const int64_t n = residual.size(0);
  const int64_t width = residual.size(1);
  at::Tensor out = at::empty({n, width}, delta.options());
  float* res = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float e = static_cast<float>(eps);
  with_activation_type(delta.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    const T* add = delta.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, n, row_grain(width), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float* row = res + i * width;
        const T* d_row = add + i * width;
#pragma omp simd
        for (int64_t d = 0; d < width; ++d) row[d] += to_float(d_row[d]);
        rms_norm_row(row, w, e, width, dst + i * width);
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------- silu_and_mul

// Gates per tile of silu_and_mul (one L1-resident float buffer).
constexpr int64_t kSiluTile = 512;

// sigmoid(g) from exp(-|g|) <= 1, so the exp never overflows.
HX_CPU_ALWAYS_INLINE Vec::F silu(Vec::F g) {
  Vec::F unused;
  const Vec::F magnitude = g < Vec::splat(0.0f) ? -g : g;
  const Vec::F e = Vec::exp_nonpositive(-magnitude, &unused);
  const Vec::F one = Vec::splat(1.0f);
  const Vec::F sigmoid = g < Vec::splat(0.0f) ? e / (one + e) : one / (one + e);
  return g * sigmoid;
}

// Rows [begin, end) of silu_and_mul, a row in tiles: gates to float (vectorised), SiLU in Vec
// lanes, then * up and one rounding.
template <typename T>
HX_CPU_ALWAYS_INLINE void silu_and_mul_rows(const T* src, T* dst, int64_t begin, int64_t end,
                                            int64_t width) {
  alignas(64) float tile[kSiluTile];
  for (int64_t i = begin; i < end; ++i) {
    const T* g_row = src + i * 2 * width;
    const T* u_row = g_row + width;
    T* o_row = dst + i * width;
    for (int64_t d0 = 0; d0 < width; d0 += kSiluTile) {
      const int64_t len = std::min<int64_t>(kSiluTile, width - d0);
      const int64_t padded = whole_vectors(len);
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) tile[l] = to_float(g_row[d0 + l]);
      for (int64_t l = len; l < padded; ++l) tile[l] = 0.0f;
      for (int64_t l = 0; l < padded; l += kLanes) {
        const Vec::F s = silu(Vec::load(tile + l));
        std::memcpy(tile + l, &s, sizeof(s));
      }
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) {
        o_row[d0 + l] = from_float<T>(tile[l] * to_float(u_row[d0 + l]));
      }
    }
  }
}

// One overload per activation type, each compiled as clones: 8-lane vectors are native only
// in the AVX2 / AVX-512 clones (the baseline splits them).
HX_CPU_CLONES void silu_and_mul_cloned(const float* src, float* dst, int64_t begin, int64_t end,
                                       int64_t width) {
  silu_and_mul_rows(src, dst, begin, end, width);
}

HX_CPU_CLONES void silu_and_mul_cloned(const c10::BFloat16* src, c10::BFloat16* dst,
                                       int64_t begin, int64_t end, int64_t width) {
  silu_and_mul_rows(src, dst, begin, end, width);
}

at::Tensor silu_and_mul_cpu(const at::Tensor& gate_up_in) {
  check_silu_and_mul_args(gate_up_in);
  const at::Tensor gate_up = gate_up_in.contiguous();
  const int64_t n = gate_up.size(0);
  const int64_t width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({n, width}, gate_up.options());
  with_activation_type(gate_up.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    const T* src = gate_up.data_ptr<T>();
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, n, row_grain(width), [&](int64_t begin, int64_t end) {
      silu_and_mul_cloned(src, dst, begin, end, width);
    });
  });
  return out;
}

// ----------------------------------------------------------------- rope_cache_attention

// x rotated by RoPE at one position: out = x * cos + roll(x, head_dim / 2) * signed_sin,
// with `table` the position's [cos | signed sin] rows (signed sin: first half negated).
template <typename T>
HX_CPU_ALWAYS_INLINE void rotate(const T* x, const float* table, int64_t head_dim, float* out) {
  const int64_t half = head_dim / 2;
  const float* cos = table;
  const float* signed_sin = table + head_dim;
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) {
    out[d] = to_float(x[d]) * cos[d] + to_float(x[d + half]) * signed_sin[d];
    out[d + half] = to_float(x[d + half]) * cos[d + half] + to_float(x[d]) * signed_sin[d + half];
  }
}

template <typename T>
struct AttentionArgs {
  const T* qkv;         // [n, (heads + 2 kv_heads) * head_dim]
  const float* rope;    // [positions, 2, head_dim]
  const int64_t* positions;
  const T* k_cache;     // [kv_heads, capacity, head_dim] (rows contiguous)
  const T* v_cache;
  int64_t cache_head_stride;
  const bool* visible;  // [n, keys] or nullptr
  T* out;               // [n, heads * head_dim]
  int64_t keys, heads, kv_heads, head_dim;
};

// Floats of scratch per parallel_for task of the attention: per query head of a group its
// scores (`keys` rounded up to whole vectors), q and accumulator, then one K / V row.
inline int64_t attention_scratch(int64_t keys, int64_t group, int64_t head_dim) {
  return group * (whole_vectors(keys) + 2 * head_dim) + head_dim;
}

// Output rows of the (row, KV head) items [begin, end): the `group` query heads that share a
// KV head are done together, so each K and V row is read and converted once for all of them.
template <typename T>
HX_CPU_ALWAYS_INLINE void attend(const AttentionArgs<T>& a, int64_t begin, int64_t end,
                                 float* scratch) {
  const int64_t hd = a.head_dim;
  const int64_t width = (a.heads + 2 * a.kv_heads) * hd;
  const int64_t group = a.heads / a.kv_heads;
  const int64_t padded = whole_vectors(a.keys);
  float* scores = scratch;                  // [group, padded]
  float* q = scores + group * padded;       // [group, hd]
  float* acc = q + group * hd;              // [group, hd]
  float* row = acc + group * hd;            // [hd]: one K or V row in float
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t item = begin; item < end; ++item) {
    const int64_t i = item / a.kv_heads;
    const int64_t kv = item % a.kv_heads;
    const T* k_head = a.k_cache + kv * a.cache_head_stride;
    const T* v_head = a.v_cache + kv * a.cache_head_stride;
    const float* table = a.rope + a.positions[i] * 2 * hd;
    for (int64_t g = 0; g < group; ++g) {
      float* qg = q + g * hd;
      rotate(a.qkv + i * width + (kv * group + g) * hd, table, hd, qg);
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) qg[d] = to_float(from_float<T>(qg[d])) * scale;
    }
    const bool* mask = a.visible ? a.visible + i * a.keys : nullptr;
    bool any_visible = false;
    for (int64_t j = 0; j < a.keys; ++j) {
      if (mask && !mask[j]) {
        for (int64_t g = 0; g < group; ++g) scores[g * padded + j] = neg_inf;
        continue;
      }
      any_visible = true;
      const T* k = k_head + j * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) row[d] = to_float(k[d]);
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q + g * hd;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < hd; ++d) dot += qg[d] * row[d];
        scores[g * padded + j] = dot;
      }
    }
    T* out_row = a.out + i * a.heads * hd + kv * group * hd;
    if (!any_visible) {  // no visible key: zero rows, never NaN
      for (int64_t d = 0; d < group * hd; ++d) out_row[d] = from_float<T>(0.0f);
      continue;
    }
    float inv_sum[kMaxGroup];
    for (int64_t g = 0; g < group; ++g) {
      float* sg = scores + g * padded;
      for (int64_t j = a.keys; j < padded; ++j) sg[j] = neg_inf;
      Vec::F vmax = Vec::splat(neg_inf);
      for (int64_t j = 0; j < padded; j += kLanes) {
        const Vec::F x = Vec::load(sg + j);
        vmax = x > vmax ? x : vmax;
      }
      const Vec::F m = Vec::splat(Vec::horizontal_max(vmax));
      Vec::F sum = Vec::F{};
      for (int64_t j = 0; j < padded; j += kLanes) {
        Vec::F unused;
        const Vec::F p = Vec::exp_nonpositive(Vec::load(sg + j) - m, &unused);
        std::memcpy(sg + j, &p, sizeof(p));
        sum += p;
      }
      inv_sum[g] = 1.0f / static_cast<float>(Vec::horizontal_sum(sum));
    }
    for (int64_t d = 0; d < group * hd; ++d) acc[d] = 0.0f;
    for (int64_t j = 0; j < a.keys; ++j) {
      if (mask && !mask[j]) continue;
      const T* v = v_head + j * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) row[d] = to_float(v[d]);
      for (int64_t g = 0; g < group; ++g) {
        const float p = scores[g * padded + j];
        float* ag = acc + g * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) ag[d] += p * row[d];
      }
    }
    for (int64_t g = 0; g < group; ++g) {
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) {
        out_row[g * hd + d] = from_float<T>(acc[g * hd + d] * inv_sum[g]);
      }
    }
  }
}

// One overload per activation type, each compiled as clones.
HX_CPU_CLONES void attend_cloned(const AttentionArgs<float>& a, int64_t begin, int64_t end,
                                 float* scratch) {
  attend(a, begin, end, scratch);
}

HX_CPU_CLONES void attend_cloned(const AttentionArgs<c10::BFloat16>& a, int64_t begin,
                                 int64_t end, float* scratch) {
  attend(a, begin, end, scratch);
}

at::Tensor rope_cache_attention_cpu(const at::Tensor& qkv_in, const at::Tensor& rope_in,
                                    const at::Tensor& positions_in, at::Tensor& k_cache,
                                    at::Tensor& v_cache, int64_t cache_len,
                                    const c10::optional<at::Tensor>& visible_in,
                                    int64_t num_heads, int64_t num_kv_heads) {
  const int64_t hd = check_rope_cache_attention_args(qkv_in, rope_in, positions_in, k_cache,
                                                     v_cache, cache_len, visible_in, num_heads,
                                                     num_kv_heads);
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor rope = rope_in.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  at::Tensor visible;
  if (visible_in.has_value()) visible = visible_in->contiguous();
  const int64_t n = qkv.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    HX_CHECK_VALUE(pos[i] >= 0 && pos[i] < rope.size(0), "positions[", i, "] = ", pos[i],
                   " is not a row of rope (", rope.size(0), " positions)");
  }
  at::Tensor out = at::empty({n, num_heads * hd}, qkv.options());
  with_activation_type(qkv.scalar_type(), [&](auto type_tag) {
    using T = decltype(type_tag);
    AttentionArgs<T> a;
    a.qkv = qkv.data_ptr<T>();
    a.rope = rope.data_ptr<float>();
    a.positions = pos;
    a.k_cache = k_cache.data_ptr<T>();
    a.v_cache = v_cache.data_ptr<T>();
    a.cache_head_stride = k_cache.stride(0);
    a.visible = visible.defined() ? visible.data_ptr<bool>() : nullptr;
    a.out = out.data_ptr<T>();
    a.keys = cache_len + n;
    a.heads = num_heads;
    a.kv_heads = num_kv_heads;
    a.head_dim = hd;
    // 1. The new rows' rotated keys and values go into the caches first:
    //    rows attend to each other (a tree node sees its ancestors).
    const int64_t width = (num_heads + 2 * num_kv_heads) * hd;
    T* k_dst = k_cache.data_ptr<T>();
    T* v_dst = v_cache.data_ptr<T>();
    std::vector<float> rotated(static_cast<size_t>(hd));
    for (int64_t i = 0; i < n; ++i) {
      const T* row = a.qkv + i * width;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t at_row = h * a.cache_head_stride + (cache_len + i) * hd;
        rotate(row + (num_heads + h) * hd, a.rope + pos[i] * 2 * hd, hd, rotated.data());
        for (int64_t d = 0; d < hd; ++d) k_dst[at_row + d] = from_float<T>(rotated[d]);
        const T* v = row + (num_heads + num_kv_heads + h) * hd;
        std::copy(v, v + hd, v_dst + at_row);
      }
    }
    // 2. One (row, KV head) item at a time; a task takes about 256 K multiply-adds.
    const int64_t per_item = std::max<int64_t>(1, a.keys * hd * 2 * (num_heads / num_kv_heads));
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / per_item);
    const int64_t scratch_floats = attention_scratch(a.keys, num_heads / num_kv_heads, hd);
    at::parallel_for(0, n * num_kv_heads, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(static_cast<size_t>(scratch_floats));
      attend_cloned(a, begin, end, scratch.data());
    });
  });
  return out;
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CPU, m) {
  m.impl("embed_hidden_rms_norm", &heterospec::embed_hidden_rms_norm_cpu);
  m.impl("fused_add_rms_norm", &heterospec::fused_add_rms_norm_cpu);
  m.impl("silu_and_mul", &heterospec::silu_and_mul_cpu);
  m.impl("rope_cache_attention", &heterospec::rope_cache_attention_cpu);
}

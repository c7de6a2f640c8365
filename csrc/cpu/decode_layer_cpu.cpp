// CPU kernels of the decode-layer ops: the small steps between the GEMMs of a
// Llama-style decoder layer (an EAGLE-3 draft head's layer, the lean target's
// layers) at decode sizes, each fused into one pass over its rows.
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
// x86-64, where the 16-lane vectors of cpu/simd.h are split in four.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HX_CPU_CLONES
#endif

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

// The loops that are all arithmetic (SiLU, the attention's scores and weighted sums) use 16
// lanes: one AVX-512 register in the x86-64-v4 clone, two in the AVX2 one.
constexpr int kWideLanes = 16;
using WideVec = cpu::Simd<kWideLanes>;

// n rounded up to whole WideVec vectors.
inline int64_t whole_vectors(int64_t n) {
  return (n + kWideLanes - 1) / kWideLanes * kWideLanes;
}

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

// sigmoid(g) from exp(-|g|) <= 1, so the exp never overflows: e / (1 + e) for g < 0, else
// 1 / (1 + e), as one division.
HX_CPU_ALWAYS_INLINE WideVec::F silu(WideVec::F g) {
  WideVec::F unused;
  const WideVec::F zero = WideVec::splat(0.0f);
  const WideVec::F one = WideVec::splat(1.0f);
  const WideVec::F e = WideVec::exp_nonpositive(g < zero ? g : -g, &unused);
  return g * ((g < zero ? e : one) / (one + e));
}

// Rows [begin, end) of silu_and_mul, a row in tiles: gates to float (vectorised), SiLU in WideVec
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
      for (int64_t l = 0; l < padded; l += kWideLanes) {
        const WideVec::F s = silu(WideVec::load(tile + l));
        std::memcpy(tile + l, &s, sizeof(s));
      }
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) {
        o_row[d0 + l] = from_float<T>(tile[l] * to_float(u_row[d0 + l]));
      }
    }
  }
}

// One overload per activation type, each compiled as clones: 16-lane vectors are native only
// in the AVX-512 clone (AVX2 splits them in two, the baseline in four).
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

// The attention of a block of query rows over one KV head: the block's queries (its rows'
// `group` query heads) against the same keys. The head's keys are converted to float once per
// block, transposed (kt[d][j]), so that the scores of kWideLanes keys are one vector sum over
// d of q[d] * kt[d][j..] (no horizontal sums), and its values once (vf[j][d]). Both are walked
// in blocks of kKeyBlock keys, every query taking its turn on a block while it sits in L1. The
// softmax is two-pass, in float32. A query with no visible key gets zeros.
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

// Keys per block of the per-query weighted sums (a block of values stays in L1).
constexpr int64_t kKeyBlock = 8 * kWideLanes;

// Floats of scratch per task of `rows` rows: the head's keys transposed and its values
// ([hd, kp] and [kp, hd], kp = keys in whole vectors), then per query (rows * group) its
// scores [kp], the query and its output accumulator [hd] each, and 1 / its softmax sum.
inline int64_t attention_scratch(int64_t keys, int64_t head_dim, int64_t queries) {
  const int64_t kp = whole_vectors(keys);
  return 2 * head_dim * kp + queries * (kp + 2 * head_dim + 1);
}

// The visible keys of each row, built once per call and shared by every KV head's items:
// per row the number it sees (keys: every key), and with a mask the list of the visible
// ones and a float copy of its mask row (1 visible, 0 not) for vector selects.
struct VisibleKeys {
  std::vector<int64_t> count;  // [n]
  std::vector<int32_t> list;   // [n, keys]
  std::vector<float> keep;     // [n, kp]
};

VisibleKeys visible_keys(const bool* visible, int64_t n, int64_t keys) {
  VisibleKeys vis;
  vis.count.assign(static_cast<size_t>(n), keys);
  if (visible == nullptr) return vis;
  const int64_t kp = whole_vectors(keys);
  vis.list.resize(static_cast<size_t>(n * keys));
  vis.keep.assign(static_cast<size_t>(n * kp), 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const bool* mask = visible + i * keys;
    int32_t* list = vis.list.data() + i * keys;
    float* keep = vis.keep.data() + i * kp;
    int64_t count = 0;
    for (int64_t j = 0; j < keys; ++j) {
      list[count] = static_cast<int32_t>(j);
      count += mask[j] ? 1 : 0;
      keep[j] = mask[j] ? 1.0f : 0.0f;
    }
    vis.count[static_cast<size_t>(i)] = count;
  }
  return vis;
}

// The scores of kQ queries (rows of q, hd apart) against kNV vectors of keys from j0: each
// step over d loads kNV key vectors once for all kQ queries (kQ * kNV accumulators, at most
// 16 of AVX-512's 32 registers), so the loop is FMA-bound rather than load-bound.
template <int kQ, int kNV>
HX_CPU_ALWAYS_INLINE void score_tile(const float* q, const float* kt, int64_t kp, int64_t hd,
                                     int64_t j0, float* scores) {
  WideVec::F acc[kQ][kNV];
  for (int a = 0; a < kQ; ++a) {
    for (int v = 0; v < kNV; ++v) acc[a][v] = WideVec::F{};
  }
  for (int64_t d = 0; d < hd; ++d) {
    const float* row = kt + d * kp + j0;
    WideVec::F k[kNV];
    for (int v = 0; v < kNV; ++v) k[v] = WideVec::load(row + v * kWideLanes);
    for (int a = 0; a < kQ; ++a) {
      const WideVec::F qd = WideVec::splat(q[a * hd + d]);
      for (int v = 0; v < kNV; ++v) acc[a][v] += qd * k[v];
    }
  }
  for (int a = 0; a < kQ; ++a) std::memcpy(scores + a * kp + j0, acc[a], sizeof(acc[a]));
}

template <int kQ>
HX_CPU_ALWAYS_INLINE void score_tile_of(int vectors, const float* q, const float* kt, int64_t kp,
                                        int64_t hd, int64_t j0, float* scores) {
  switch (vectors) {
    case 1: score_tile<kQ, 1>(q, kt, kp, hd, j0, scores); break;
    case 2: score_tile<kQ, 2>(q, kt, kp, hd, j0, scores); break;
    case 3: score_tile<kQ, 3>(q, kt, kp, hd, j0, scores); break;
    default: score_tile<kQ, 4>(q, kt, kp, hd, j0, scores); break;
  }
}

// All scores [queries, kp]: tiles of up to 4 queries x 4 vectors of keys, key blocks outermost
// so that a block of kt stays in L1 while every query passes over it.
HX_CPU_ALWAYS_INLINE void all_scores(const float* q, int64_t queries, const float* kt,
                                     int64_t kp, int64_t hd, float* scores) {
  for (int64_t j0 = 0; j0 < kp; j0 += 4 * kWideLanes) {
    const int vectors = static_cast<int>(std::min<int64_t>(4, (kp - j0) / kWideLanes));
    for (int64_t q0 = 0; q0 < queries; q0 += 4) {
      const float* qq = q + q0 * hd;
      float* sq = scores + q0 * kp;
      switch (std::min<int64_t>(4, queries - q0)) {
        case 1: score_tile_of<1>(vectors, qq, kt, kp, hd, j0, sq); break;
        case 2: score_tile_of<2>(vectors, qq, kt, kp, hd, j0, sq); break;
        case 3: score_tile_of<3>(vectors, qq, kt, kp, hd, j0, sq); break;
        default: score_tile_of<4>(vectors, qq, kt, kp, hd, j0, sq); break;
      }
    }
  }
}

// acc rows of kQ queries (hd == kHV * kWideLanes apart) += sum over keys [0, keys) of
// p[a][j] * vf[j][..]: each value row is loaded once for all kQ queries. Only for values
// that are all finite: a masked key's weight is exactly 0, and 0 * finite adds nothing.
template <int kQ, int kHV>
HX_CPU_ALWAYS_INLINE void values_tile(const float* p, int64_t kp, const float* vf, int64_t keys,
                                      float* out) {
  WideVec::F acc[kQ][kHV];
  for (int a = 0; a < kQ; ++a) {
    for (int v = 0; v < kHV; ++v) acc[a][v] = WideVec::F{};
  }
  for (int64_t j = 0; j < keys; ++j) {
    WideVec::F x[kHV];
    for (int v = 0; v < kHV; ++v) x[v] = WideVec::load(vf + (j * kHV + v) * kWideLanes);
    for (int a = 0; a < kQ; ++a) {
      const WideVec::F pj = WideVec::splat(p[a * kp + j]);
      for (int v = 0; v < kHV; ++v) acc[a][v] += pj * x[v];
    }
  }
  for (int a = 0; a < kQ; ++a) std::memcpy(out + a * kHV * kWideLanes, acc[a], sizeof(acc[a]));
}

// acc[0 .. kHV * kWideLanes) += sum over keys j = key(t), t in [t0, t1), of p[j] * vf[j][..]
// (head_dim == kHV * kWideLanes): two keys per step into two register accumulators, so that
// 2 * kHV FMA chains are in flight. `key` maps a step to a key: the identity over a dense
// range, or a row's list of visible keys.
template <int kHV, typename KeyOf>
HX_CPU_ALWAYS_INLINE void weighted_values(const float* p, const float* vf, KeyOf key, int64_t t0,
                                          int64_t t1, float* out) {
  WideVec::F acc0[kHV], acc1[kHV];
  for (int v = 0; v < kHV; ++v) {
    acc0[v] = WideVec::load(out + v * kWideLanes);
    acc1[v] = WideVec::F{};
  }
  int64_t t = t0;
  for (; t + 1 < t1; t += 2) {
    const int64_t j0 = key(t), j1 = key(t + 1);
    const WideVec::F p0 = WideVec::splat(p[j0]), p1 = WideVec::splat(p[j1]);
    const float* r0 = vf + j0 * kHV * kWideLanes;
    const float* r1 = vf + j1 * kHV * kWideLanes;
    for (int v = 0; v < kHV; ++v) {
      acc0[v] += p0 * WideVec::load(r0 + v * kWideLanes);
      acc1[v] += p1 * WideVec::load(r1 + v * kWideLanes);
    }
  }
  if (t < t1) {
    const int64_t j = key(t);
    const WideVec::F pj = WideVec::splat(p[j]);
    for (int v = 0; v < kHV; ++v) acc0[v] += pj * WideVec::load(vf + (j * kHV + v) * kWideLanes);
  }
  for (int v = 0; v < kHV; ++v) acc0[v] += acc1[v];
  std::memcpy(out, acc0, sizeof(acc0));
}

// The same for any head_dim.
template <typename KeyOf>
HX_CPU_ALWAYS_INLINE void weighted_values_any(const float* p, const float* vf, KeyOf key,
                                              int64_t t0, int64_t t1, int64_t hd, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j = key(t);
    const float pj = p[j];
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) out[d] += pj * vf[j * hd + d];
  }
}

template <typename KeyOf>
HX_CPU_ALWAYS_INLINE void add_weighted_values(const float* p, const float* vf, KeyOf key,
                                              int64_t t0, int64_t t1, int64_t hd, float* out) {
  if (hd == 4 * kWideLanes) {
    weighted_values<4>(p, vf, key, t0, t1, out);
  } else if (hd == 8 * kWideLanes) {
    weighted_values<8>(p, vf, key, t0, t1, out);
  } else {
    weighted_values_any(p, vf, key, t0, t1, hd, out);
  }
}

// Rows [row_begin, row_end) of KV head `kv`.
template <typename T>
HX_CPU_ALWAYS_INLINE void attend(const AttentionArgs<T>& a, int64_t kv, int64_t row_begin,
                                 int64_t row_end, float* scratch, const VisibleKeys& vis) {
  const int64_t hd = a.head_dim;
  const int64_t keys = a.keys;
  const int64_t kp = whole_vectors(keys);
  const int64_t width = (a.heads + 2 * a.kv_heads) * hd;
  const int64_t group = a.heads / a.kv_heads;
  const int64_t rows = row_end - row_begin;
  const int64_t queries = rows * group;  // query qi: row qi / group, head qi % group
  float* kt = scratch;                   // [hd, kp]
  float* vf = kt + hd * kp;              // [kp, hd]
  float* scores = vf + kp * hd;          // [queries, kp]
  float* q = scores + queries * kp;      // [queries, hd]
  float* acc = q + queries * hd;         // [queries, hd]
  float* inv_sum = acc + queries * hd;   // [queries]; 0: no visible key
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const T* k_head = a.k_cache + kv * a.cache_head_stride;
  const T* v_head = a.v_cache + kv * a.cache_head_stride;
  for (int64_t j = 0; j < keys; ++j) {
    const T* k = k_head + j * hd;
    for (int64_t d = 0; d < hd; ++d) kt[d * kp + j] = to_float(k[d]);
  }
  for (int64_t d = 0; d < hd; ++d) {
    for (int64_t j = keys; j < kp; ++j) kt[d * kp + j] = 0.0f;
  }
  bool values_finite = true;  // then masked keys need no skipping in the weighted sum
  {
    float spread = 0.0f;  // inf - inf and NaN make it NaN
#pragma omp simd reduction(+ : spread)
    for (int64_t e = 0; e < keys * hd; ++e) {
      vf[e] = to_float(v_head[e]);
      spread += vf[e] - vf[e];
    }
    values_finite = spread == 0.0f;
  }
  // query qi belongs to row row_begin + qi / group
  auto visible_count = [&](int64_t qi) {
    return vis.count[static_cast<size_t>(row_begin + qi / group)];
  };
  auto dense = [&](int64_t qi) { return visible_count(qi) == keys; };
  // 1. The queries: RoPE, rounded to T (as a bfloat16 cache holds them), scaled.
  for (int64_t qi = 0; qi < queries; ++qi) {
    const int64_t i = row_begin + qi / group;
    const int64_t head = kv * group + qi % group;
    float* qq = q + qi * hd;
    rotate(a.qkv + i * width + head * hd, a.rope + a.positions[i] * 2 * hd, hd, qq);
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) qq[d] = to_float(from_float<T>(qq[d])) * scale;
  }
  // 2. Scores of every query against every key.
  all_scores(q, queries, kt, kp, hd, scores);
  // 3. Softmax numerators in place of the scores (masked keys: 0), and 1 / their sums.
  for (int64_t qi = 0; qi < queries; ++qi) {
    float* sq = scores + qi * kp;
    if (visible_count(qi) == 0) {
      inv_sum[qi] = 0.0f;
      for (int64_t j = 0; j < kp; ++j) sq[j] = 0.0f;
      continue;
    }
    if (!dense(qi)) {
      const float* keep = vis.keep.data() + (row_begin + qi / group) * kp;
      for (int64_t j = 0; j < kp; j += kWideLanes) {
        const WideVec::F x = WideVec::load(sq + j);
        const WideVec::F y =
            WideVec::load(keep + j) != WideVec::splat(0.0f) ? x : WideVec::splat(neg_inf);
        std::memcpy(sq + j, &y, sizeof(y));
      }
    }
    for (int64_t j = keys; j < kp; ++j) sq[j] = neg_inf;
    WideVec::F vmax = WideVec::splat(neg_inf);
    for (int64_t j = 0; j < kp; j += kWideLanes) {
      const WideVec::F x = WideVec::load(sq + j);
      vmax = x > vmax ? x : vmax;
    }
    const WideVec::F m = WideVec::splat(WideVec::horizontal_max(vmax));
    WideVec::F sum = WideVec::F{};
    for (int64_t j = 0; j < kp; j += kWideLanes) {
      WideVec::F unused;
      const WideVec::F p = WideVec::exp_nonpositive(WideVec::load(sq + j) - m, &unused);
      std::memcpy(sq + j, &p, sizeof(p));
      sum += p;
    }
    inv_sum[qi] = 1.0f / static_cast<float>(WideVec::horizontal_sum(sum));
  }
  // 4. The weighted values. When every value is finite, a masked key's weight is exactly 0
  //    and adds nothing, so tiles of 4 queries share each value row. Otherwise per query, a
  //    block of keys at a time, a masked row walking its list of visible keys (masked values
  //    never enter, whatever they hold).
  for (int64_t e = 0; e < queries * hd; ++e) acc[e] = 0.0f;
  if (values_finite && hd == 4 * kWideLanes) {  // all queries, tiles of 4
    for (int64_t q0 = 0; q0 < queries; q0 += 4) {
      const float* p = scores + q0 * kp;
      float* out = acc + q0 * hd;
      switch (std::min<int64_t>(4, queries - q0)) {
        case 1: values_tile<1, 4>(p, kp, vf, keys, out); break;
        case 2: values_tile<2, 4>(p, kp, vf, keys, out); break;
        case 3: values_tile<3, 4>(p, kp, vf, keys, out); break;
        default: values_tile<4, 4>(p, kp, vf, keys, out); break;
      }
    }
  } else {  // per query, a masked row walking its list of visible keys
    std::vector<int64_t> cursor(static_cast<size_t>(queries), 0);  // position in the row's list
    for (int64_t b0 = 0; b0 < keys; b0 += kKeyBlock) {
      const int64_t b1 = std::min<int64_t>(keys, b0 + kKeyBlock);
      for (int64_t qi = 0; qi < queries; ++qi) {
        if (inv_sum[qi] == 0.0f) continue;
        const float* p = scores + qi * kp;
        float* out = acc + qi * hd;
        if (dense(qi)) {
          add_weighted_values(p, vf, [](int64_t t) { return t; }, b0, b1, hd, out);
          continue;
        }
        const int32_t* list = vis.list.data() + (row_begin + qi / group) * keys;
        const int64_t count = visible_count(qi);
        int64_t& t0 = cursor[static_cast<size_t>(qi)];
        int64_t t1 = t0;
        while (t1 < count && list[t1] < b1) ++t1;
        add_weighted_values(p, vf, [list](int64_t t) { return static_cast<int64_t>(list[t]); },
                            t0, t1, hd, out);
        t0 = t1;
      }
    }
  }
  for (int64_t qi = 0; qi < queries; ++qi) {
    const int64_t i = row_begin + qi / group;
    const int64_t head = kv * group + qi % group;
    T* out_row = a.out + i * a.heads * hd + head * hd;
    const float* src = acc + qi * hd;
    const float inv = inv_sum[qi];  // 0 for a query that sees no key: a zero row, never NaN
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) out_row[d] = from_float<T>(src[d] * inv);
  }
}

// One overload per activation type, each compiled as clones.
HX_CPU_CLONES void attend_cloned(const AttentionArgs<float>& a, int64_t kv, int64_t row_begin,
                                 int64_t row_end, float* scratch, const VisibleKeys& vis) {
  attend(a, kv, row_begin, row_end, scratch, vis);
}

HX_CPU_CLONES void attend_cloned(const AttentionArgs<c10::BFloat16>& a, int64_t kv,
                                 int64_t row_begin, int64_t row_end, float* scratch,
                                 const VisibleKeys& vis) {
  attend(a, kv, row_begin, row_end, scratch, vis);
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
    // 2. Items are (KV head, block of rows): a block shares one float copy of its head's
    //    keys and values, so the rows are split into only as many blocks as it takes to give
    //    every thread about two items.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t blocks = std::min<int64_t>(
        n, std::max<int64_t>(1, (2 * threads + num_kv_heads - 1) / num_kv_heads));
    const int64_t rows_per_block = (n + blocks - 1) / blocks;
    const int64_t scratch_floats =
        attention_scratch(a.keys, hd, rows_per_block * (num_heads / num_kv_heads));
    const VisibleKeys vis = visible_keys(a.visible, n, a.keys);
    at::parallel_for(0, num_kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(static_cast<size_t>(scratch_floats));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t kv = item % num_kv_heads;
        const int64_t row_begin = item / num_kv_heads * rows_per_block;
        const int64_t row_end = std::min<int64_t>(n, row_begin + rows_per_block);
        if (row_begin < row_end) attend_cloned(a, kv, row_begin, row_end, scratch.data(), vis);
      }
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

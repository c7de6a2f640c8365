// Argument checks of the decode-layer ops (embed_hidden_rms_norm, fused_add_rms_norm,
// silu_and_mul, rope_cache_attention): ranks, dtypes, sizes and devices. The
// fakes in heterospec_ext/ops/decode_layer.py check the same, worded alike.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "check.h"

namespace heterospec {
namespace cpu_attention {
// Query heads per KV head that rope_cache_attention handles (its per-head sums live on the
// stack).
constexpr int64_t kMaxGroup = 64;
}  // namespace cpu_attention

// Activations of the decode-layer ops: float32, or bfloat16 (the lean CPU path).
#define HX_CHECK_ACTIVATION_DTYPE(t)                                              \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kBFloat16, \
              #t " must be float32 or bfloat16, got ", (t).scalar_type())

#define HX_CHECK_CPU(t)                                                           \
  TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor (the decode-layer ops "   \
              "have CPU kernels only), got device ", (t).device())

#define HX_CHECK_NORM_WEIGHT(w, width)                                            \
  do {                                                                            \
    HX_CHECK_DIM(w, 1);                                                           \
    HX_CHECK_DTYPE(w, at::kFloat);                                                \
    HX_CHECK_SIZE(w, 0, width);                                                   \
    HX_CHECK_CPU(w);                                                              \
  } while (0)

inline void check_embed_hidden_rms_norm_args(const at::Tensor& token_ids,
                                             const at::Tensor& embed, const at::Tensor& hidden,
                                             const at::Tensor& embed_weight,
                                             const at::Tensor& hidden_weight) {
  HX_CHECK_DIM(token_ids, 1);
  HX_CHECK_DTYPE(token_ids, at::kLong);
  HX_CHECK_CPU(token_ids);
  HX_CHECK_DIM(embed, 2);
  HX_CHECK_ACTIVATION_DTYPE(embed);
  HX_CHECK_CPU(embed);
  HX_CHECK_DIM(hidden, 2);
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == embed.scalar_type(),
              "hidden must be float32 or embed's dtype (", embed.scalar_type(), "), got ",
              hidden.scalar_type());
  HX_CHECK_SIZE(hidden, 0, token_ids.size(0));
  HX_CHECK_SIZE(hidden, 1, embed.size(1));
  HX_CHECK_CPU(hidden);
  HX_CHECK_NORM_WEIGHT(embed_weight, embed.size(1));
  HX_CHECK_NORM_WEIGHT(hidden_weight, embed.size(1));
}

inline void check_fused_add_rms_norm_args(const at::Tensor& residual, const at::Tensor& delta,
                                    const at::Tensor& weight) {
  HX_CHECK_DIM(residual, 2);
  HX_CHECK_DTYPE(residual, at::kFloat);
  HX_CHECK_CPU(residual);
  TORCH_CHECK(residual.is_contiguous(), "residual must be contiguous (it is updated in place)");
  HX_CHECK_DIM(delta, 2);
  HX_CHECK_ACTIVATION_DTYPE(delta);
  HX_CHECK_SIZE(delta, 0, residual.size(0));
  HX_CHECK_SIZE(delta, 1, residual.size(1));
  HX_CHECK_CPU(delta);
  HX_CHECK_NORM_WEIGHT(weight, residual.size(1));
}

inline void check_silu_and_mul_args(const at::Tensor& gate_up) {
  HX_CHECK_DIM(gate_up, 2);
  HX_CHECK_ACTIVATION_DTYPE(gate_up);
  HX_CHECK_CPU(gate_up);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up.size(1) must be even ([gate | up]), got ",
              gate_up.size(1));
}

// Returns head_dim.
inline int64_t check_rope_cache_attention_args(
    const at::Tensor& qkv, const at::Tensor& rope, const at::Tensor& positions,
    const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t cache_len,
    const c10::optional<at::Tensor>& visible_or_none, int64_t num_heads, int64_t num_kv_heads) {
  HX_CHECK_VALUE(num_heads >= 1 && num_kv_heads >= 1 && num_heads % num_kv_heads == 0 &&
                     num_heads / num_kv_heads <= cpu_attention::kMaxGroup,
                 "num_heads must be a positive multiple of num_kv_heads >= 1, at most ",
                 cpu_attention::kMaxGroup, " times it, got num_heads = ", num_heads,
                 " and num_kv_heads = ", num_kv_heads);
  HX_CHECK_DIM(qkv, 2);
  HX_CHECK_ACTIVATION_DTYPE(qkv);
  HX_CHECK_CPU(qkv);
  const int64_t columns = num_heads + 2 * num_kv_heads;
  TORCH_CHECK(qkv.size(1) % columns == 0 && qkv.size(1) / columns % 2 == 0,
              "qkv.size(1) must be (num_heads + 2 * num_kv_heads) * head_dim with an even "
              "head_dim, got ", qkv.size(1), " for ", num_heads, " + 2 * ", num_kv_heads,
              " heads");
  const int64_t head_dim = qkv.size(1) / columns;
  const int64_t n = qkv.size(0);
  HX_CHECK_DIM(rope, 3);
  HX_CHECK_DTYPE(rope, at::kFloat);
  HX_CHECK_SIZE(rope, 1, 2);
  HX_CHECK_SIZE(rope, 2, head_dim);
  HX_CHECK_CPU(rope);
  HX_CHECK_DIM(positions, 1);
  HX_CHECK_DTYPE(positions, at::kLong);
  HX_CHECK_SIZE(positions, 0, n);
  HX_CHECK_CPU(positions);
  for (const at::Tensor* cache : {&k_cache, &v_cache}) {
    const char* name = cache == &k_cache ? "k_cache" : "v_cache";
    TORCH_CHECK(cache->dim() == 3, name, " must be a 3-D tensor, got ", cache->dim(),
                "-D with shape ", hx_shape(*cache));
    TORCH_CHECK(cache->scalar_type() == qkv.scalar_type(), name, " must have qkv's dtype ",
                qkv.scalar_type(), ", got ", cache->scalar_type());
    TORCH_CHECK(cache->size(0) == num_kv_heads && cache->size(2) == head_dim, name,
                " must be [num_kv_heads = ", num_kv_heads, ", capacity, head_dim = ", head_dim,
                "], got ", hx_shape(*cache));
    TORCH_CHECK(cache->device().is_cpu(), name, " must be a CPU tensor, got device ",
                cache->device());
    TORCH_CHECK(cache->stride(2) == 1 && cache->stride(1) == head_dim, name,
                " must have contiguous rows of head_dim (strides [any, head_dim, 1]), got "
                "strides ", hx_shape(cache->strides()));
  }
  HX_CHECK_SIZE(v_cache, 1, k_cache.size(1));
  TORCH_CHECK(k_cache.stride(0) == v_cache.stride(0),
              "k_cache and v_cache must have the same strides, got ", hx_shape(k_cache.strides()),
              " and ", hx_shape(v_cache.strides()));
  HX_CHECK_VALUE(cache_len >= 0 && cache_len <= k_cache.size(1) - n,
                 "cache_len must be in [0, capacity - n] = [0, ", k_cache.size(1) - n,
                 "] (k_cache holds ", k_cache.size(1), " rows and qkv adds ", n, "), got ",
                 cache_len);
  if (visible_or_none.has_value()) {
    const at::Tensor& visible = *visible_or_none;
    HX_CHECK_DIM(visible, 2);
    HX_CHECK_DTYPE(visible, at::kBool);
    HX_CHECK_SIZE(visible, 0, n);
    HX_CHECK_SIZE(visible, 1, cache_len + n);
    HX_CHECK_CPU(visible);
  }
  return head_dim;
}

}  // namespace heterospec

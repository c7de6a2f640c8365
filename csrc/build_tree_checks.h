// Argument checks of build_tree / build_tree_out, shared by the CPU and CUDA
// bindings (shapes, dtypes, devices; data checks live in the kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <tuple>

#include "check.h"
#include "core/build_tree.h"

namespace heterospec {

inline void check_build_tree_args(const at::Tensor& pool_parents, const at::Tensor& pool_scores,
                                  const at::Tensor& pool_tokens, const at::Tensor& top_n,
                                  int64_t n_max) {
  HX_CHECK_DIM(pool_parents, 2);
  HX_CHECK_DTYPE(pool_parents, at::kLong);
  TORCH_CHECK(pool_parents.size(1) >= 1,
              "pool_parents must have at least one node per request (node 0 is the root), got "
              "shape ", hx_shape(pool_parents));
  TORCH_CHECK(pool_parents.size(1) < (int64_t{1} << 31),
              "pool_parents.size(1) must be < 2^31, got ", pool_parents.size(1));
  HX_CHECK_DIM(pool_scores, 2);
  HX_CHECK_DTYPE(pool_scores, at::kFloat);
  HX_CHECK_SIZE(pool_scores, 0, pool_parents.size(0));
  HX_CHECK_SIZE(pool_scores, 1, pool_parents.size(1));
  HX_CHECK_DIM(pool_tokens, 2);
  HX_CHECK_DTYPE(pool_tokens, at::kLong);
  HX_CHECK_SIZE(pool_tokens, 0, pool_parents.size(0));
  HX_CHECK_SIZE(pool_tokens, 1, pool_parents.size(1));
  HX_CHECK_DIM(top_n, 1);
  HX_CHECK_DTYPE(top_n, at::kLong);
  HX_CHECK_SIZE(top_n, 0, pool_parents.size(0));
  TORCH_CHECK(n_max >= 1, "n_max must be >= 1, got ", n_max);
  TORCH_CHECK(n_max < (int64_t{1} << 31), "n_max must be < 2^31, got ", n_max);
  HX_CHECK_SAME_DEVICE(pool_scores, pool_parents);
  HX_CHECK_SAME_DEVICE(pool_tokens, pool_parents);
  HX_CHECK_SAME_DEVICE(top_n, pool_parents);
}

#define HX_CHECK_BUILD_TREE_OUT(t, dt, ...)                                     \
  do {                                                                          \
    TORCH_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt),        \
                ", got ", (t).scalar_type());                                   \
    TORCH_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t               \
                " must have shape ", hx_shape(at::IntArrayRef({__VA_ARGS__})),  \
                ", got ", hx_shape(t));                                         \
    HX_CHECK_SAME_DEVICE(t, pool_parents);                                      \
    TORCH_CHECK((t).is_contiguous(), #t " must be contiguous");                 \
  } while (0)

// n_max is taken from selected.size(1) by the _out op.
inline void check_build_tree_outputs(const at::Tensor& pool_parents, const at::Tensor& selected,
                                     const at::Tensor& tokens, const at::Tensor& parents,
                                     const at::Tensor& depth, const at::Tensor& mask,
                                     const at::Tensor& packed_mask,
                                     const at::Tensor& first_child,
                                     const at::Tensor& next_sibling, const at::Tensor& retrieve,
                                     const at::Tensor& num_nodes) {
  HX_CHECK_DIM(selected, 2);
  const int64_t batch = pool_parents.size(0);
  const int64_t n_max = selected.size(1);
  const int64_t words = core::packed_mask_words(n_max);
  HX_CHECK_BUILD_TREE_OUT(selected, at::kLong, batch, n_max);
  HX_CHECK_BUILD_TREE_OUT(tokens, at::kLong, batch, n_max);
  HX_CHECK_BUILD_TREE_OUT(parents, at::kLong, batch, n_max);
  HX_CHECK_BUILD_TREE_OUT(depth, at::kLong, batch, n_max);
  HX_CHECK_BUILD_TREE_OUT(mask, at::kBool, batch, n_max, n_max);
  HX_CHECK_BUILD_TREE_OUT(packed_mask, at::kInt, batch, n_max, words);
  HX_CHECK_BUILD_TREE_OUT(first_child, at::kLong, batch, n_max);
  HX_CHECK_BUILD_TREE_OUT(next_sibling, at::kLong, batch, n_max);
  HX_CHECK_BUILD_TREE_OUT(retrieve, at::kLong, batch, n_max, n_max);
  HX_CHECK_BUILD_TREE_OUT(num_nodes, at::kLong, batch);
}

#undef HX_CHECK_BUILD_TREE_OUT

using BuildTreeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                   at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The functional build_tree of both backends: the outputs are allocated from
// the input shapes alone (never from data, so it is capture-safe) on
// pool_parents' device, then filled by the backend's build_tree_out. The
// _out implementation is a template argument so that each backend registers
// build_tree_functional<its build_tree_out> directly.
template <auto write_outputs>
BuildTreeResult build_tree_functional(const at::Tensor& pool_parents,
                                      const at::Tensor& pool_scores,
                                      const at::Tensor& pool_tokens, const at::Tensor& top_n,
                                      int64_t n_max) {
  check_build_tree_args(pool_parents, pool_scores, pool_tokens, top_n, n_max);
  const int64_t batch = pool_parents.size(0);
  const auto i64 = pool_parents.options().dtype(at::kLong);
  at::Tensor selected = at::empty({batch, n_max}, i64);
  at::Tensor tokens = at::empty({batch, n_max}, i64);
  at::Tensor parents = at::empty({batch, n_max}, i64);
  at::Tensor depth = at::empty({batch, n_max}, i64);
  at::Tensor mask = at::empty({batch, n_max, n_max}, pool_parents.options().dtype(at::kBool));
  at::Tensor packed_mask = at::empty({batch, n_max, core::packed_mask_words(n_max)},
                                     pool_parents.options().dtype(at::kInt));
  at::Tensor first_child = at::empty({batch, n_max}, i64);
  at::Tensor next_sibling = at::empty({batch, n_max}, i64);
  at::Tensor retrieve = at::empty({batch, n_max, n_max}, i64);
  at::Tensor num_nodes = at::empty({batch}, i64);
  write_outputs(pool_parents, pool_scores, pool_tokens, top_n, selected, tokens, parents, depth,
                mask, packed_mask, first_child, next_sibling, retrieve, num_nodes);
  return {selected, tokens, parents, depth, mask, packed_mask,
          first_child, next_sibling, retrieve, num_nodes};
}

}  // namespace heterospec

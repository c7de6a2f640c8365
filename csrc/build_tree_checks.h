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

// Every metadata check of build_tree_out: the inputs as build_tree checks them
// with n_max = selected.size(1), then the outputs (contiguous, the shapes of
// heterospec_ext.Tree, on pool_parents' device). Returns n_max.
inline int64_t check_build_tree_out_args(
    const at::Tensor& pool_parents, const at::Tensor& pool_scores, const at::Tensor& pool_tokens,
    const at::Tensor& top_n, const at::Tensor& selected, const at::Tensor& tokens,
    const at::Tensor& parents, const at::Tensor& depth, const at::Tensor& mask,
    const at::Tensor& packed_mask, const at::Tensor& first_child, const at::Tensor& next_sibling,
    const at::Tensor& retrieve, const at::Tensor& num_nodes) {
  HX_CHECK_DIM(selected, 2);
  const int64_t n_max = selected.size(1);
  check_build_tree_args(pool_parents, pool_scores, pool_tokens, top_n, n_max);
  const int64_t batch = pool_parents.size(0);
  const int64_t words = core::packed_mask_words(n_max);
  const at::Tensor& in = pool_parents;
  const char* in_name = "pool_parents";
  check_output(selected, "selected", at::kLong, {batch, n_max}, in, in_name);
  check_output(tokens, "tokens", at::kLong, {batch, n_max}, in, in_name);
  check_output(parents, "parents", at::kLong, {batch, n_max}, in, in_name);
  check_output(depth, "depth", at::kLong, {batch, n_max}, in, in_name);
  check_output(mask, "mask", at::kBool, {batch, n_max, n_max}, in, in_name);
  check_output(packed_mask, "packed_mask", at::kInt, {batch, n_max, words}, in, in_name);
  check_output(first_child, "first_child", at::kLong, {batch, n_max}, in, in_name);
  check_output(next_sibling, "next_sibling", at::kLong, {batch, n_max}, in, in_name);
  check_output(retrieve, "retrieve", at::kLong, {batch, n_max, n_max}, in, in_name);
  check_output(num_nodes, "num_nodes", at::kLong, {batch}, in, in_name);
  return n_max;
}

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

// Argument checks of stratify / stratify_out, shared by the CPU and CUDA
// bindings (shapes, dtypes, devices; data checks live in the kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <tuple>

#include "check.h"

namespace heterospec {

inline void check_stratify_args(const at::Tensor& step_entropy, const at::Tensor& confidence,
                                const at::Tensor& parents, const at::Tensor& thresholds,
                                const at::Tensor& policy) {
  HX_CHECK_DIM(parents, 2);
  HX_CHECK_DTYPE(parents, at::kLong);
  TORCH_CHECK(parents.size(1) >= 1,
              "parents must have at least one node per request (node 0 is the root), got shape ",
              hx_shape(parents));
  TORCH_CHECK(parents.size(1) < (int64_t{1} << 31),
              "parents.size(1) must be < 2^31, got ", parents.size(1));
  HX_CHECK_DIM(step_entropy, 2);
  HX_CHECK_DTYPE(step_entropy, at::kFloat);
  HX_CHECK_SIZE(step_entropy, 0, parents.size(0));
  HX_CHECK_SIZE(step_entropy, 1, parents.size(1));
  HX_CHECK_DIM(confidence, 2);
  HX_CHECK_DTYPE(confidence, at::kFloat);
  HX_CHECK_SIZE(confidence, 0, parents.size(0));
  HX_CHECK_SIZE(confidence, 1, parents.size(1));
  HX_CHECK_DIM(thresholds, 1);
  HX_CHECK_DTYPE(thresholds, at::kFloat);
  HX_CHECK_DIM(policy, 2);
  HX_CHECK_DTYPE(policy, at::kLong);
  HX_CHECK_SIZE(policy, 0, thresholds.size(0) + 1);
  HX_CHECK_SIZE(policy, 1, 2);
  HX_CHECK_SAME_DEVICE(step_entropy, parents);
  HX_CHECK_SAME_DEVICE(confidence, parents);
  HX_CHECK_SAME_DEVICE(thresholds, parents);
  HX_CHECK_SAME_DEVICE(policy, parents);
}

// Every metadata check of stratify_out: the inputs as stratify checks them,
// then the outputs (contiguous [B] tensors on parents' device).
inline void check_stratify_out_args(const at::Tensor& step_entropy, const at::Tensor& confidence,
                                    const at::Tensor& parents, const at::Tensor& thresholds,
                                    const at::Tensor& policy, const at::Tensor& path_entropy,
                                    const at::Tensor& pstar, const at::Tensor& stratum,
                                    const at::Tensor& extra_depth, const at::Tensor& top_n) {
  check_stratify_args(step_entropy, confidence, parents, thresholds, policy);
  const int64_t batch = parents.size(0);
  check_output(path_entropy, "path_entropy", at::kFloat, {batch}, parents, "parents");
  check_output(pstar, "pstar", at::kLong, {batch}, parents, "parents");
  check_output(stratum, "stratum", at::kLong, {batch}, parents, "parents");
  check_output(extra_depth, "extra_depth", at::kLong, {batch}, parents, "parents");
  check_output(top_n, "top_n", at::kLong, {batch}, parents, "parents");
}

// The functional stratify of both backends: the outputs are allocated from the
// input shapes alone (never from data, so it is capture-safe) on parents'
// device, then filled by the backend's stratify_out. The _out implementation
// is a template argument so that each backend registers
// stratify_functional<its stratify_out> directly.
template <auto write_outputs>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stratify_functional(
    const at::Tensor& step_entropy, const at::Tensor& confidence, const at::Tensor& parents,
    const at::Tensor& thresholds, const at::Tensor& policy) {
  check_stratify_args(step_entropy, confidence, parents, thresholds, policy);
  const int64_t batch = parents.size(0);
  const auto i64 = parents.options().dtype(at::kLong);
  at::Tensor path_entropy = at::empty({batch}, parents.options().dtype(at::kFloat));
  at::Tensor pstar = at::empty({batch}, i64);
  at::Tensor stratum = at::empty({batch}, i64);
  at::Tensor extra_depth = at::empty({batch}, i64);
  at::Tensor top_n = at::empty({batch}, i64);
  write_outputs(step_entropy, confidence, parents, thresholds, policy, path_entropy, pstar,
                stratum, extra_depth, top_n);
  return {path_entropy, pstar, stratum, extra_depth, top_n};
}

}  // namespace heterospec

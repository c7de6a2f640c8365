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

#define HX_CHECK_STRATIFY_OUT(t, dt)                                            \
  do {                                                                          \
    HX_CHECK_DIM(t, 1);                                                         \
    HX_CHECK_DTYPE(t, dt);                                                      \
    HX_CHECK_SIZE(t, 0, batch);                                                 \
    HX_CHECK_SAME_DEVICE(t, parents);                                           \
    TORCH_CHECK((t).is_contiguous(), #t " must be contiguous");                 \
  } while (0)

inline void check_stratify_outputs(const at::Tensor& parents, const at::Tensor& path_entropy,
                                   const at::Tensor& pstar, const at::Tensor& stratum,
                                   const at::Tensor& extra_depth, const at::Tensor& top_n) {
  const int64_t batch = parents.size(0);
  HX_CHECK_STRATIFY_OUT(path_entropy, at::kFloat);
  HX_CHECK_STRATIFY_OUT(pstar, at::kLong);
  HX_CHECK_STRATIFY_OUT(stratum, at::kLong);
  HX_CHECK_STRATIFY_OUT(extra_depth, at::kLong);
  HX_CHECK_STRATIFY_OUT(top_n, at::kLong);
}

#undef HX_CHECK_STRATIFY_OUT

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

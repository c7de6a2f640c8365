// Argument checks of draft_topk_entropy shared by the CPU and CUDA bindings.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "check.h"
#include "core/macros.h"

namespace heterospec {

// Checks logits, k and temperature; returns the temperature as the float32
// that every backend divides by.
inline float check_draft_topk_entropy_args(const at::Tensor& logits, int64_t k,
                                           double temperature) {
  HX_CHECK_DIM(logits, 2);
  HX_CHECK_LOGIT_DTYPE(logits);
  const int64_t vocab = logits.size(1);
  // Token ids travel as int32 inside the kernels; INT32_MAX is the padding id.
  TORCH_CHECK(vocab < std::numeric_limits<int32_t>::max(),
              "logits.size(1) (the vocabulary) must be < 2^31 - 1, got ", vocab);
  TORCH_CHECK_VALUE(k >= 1 && k <= core::kMaxTopK && k <= vocab,
                    "k must satisfy 1 <= k <= min(V, ", core::kMaxTopK,
                    ") with V = logits.size(1) = ", vocab, ", got k = ", k);
  const float temperature_f = static_cast<float>(temperature);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature_f > 0.0f &&
                        std::isfinite(temperature_f),
                    "temperature must be a finite number > 0 (also as float32), got ",
                    hx_value(temperature));
  return temperature_f;
}

// Every metadata check of draft_topk_entropy_out: the arguments as
// draft_topk_entropy checks them, that logits is on the backend's device type
// (`backend`; when only the outputs are, the dispatcher still picks this
// backend, and the error should name logits), then the outputs (contiguous,
// on logits' device; topk_logprobs / topk_ids [rows, k], the others [rows]).
// Returns the float32 temperature.
inline float check_draft_topk_entropy_out_args(const at::Tensor& logits, int64_t k,
                                               double temperature, c10::DeviceType backend,
                                               const at::Tensor& topk_logprobs,
                                               const at::Tensor& topk_ids,
                                               const at::Tensor& topk_entropy,
                                               const at::Tensor& entropy,
                                               const at::Tensor& logsumexp) {
  const float temperature_f = check_draft_topk_entropy_args(logits, k, temperature);
  TORCH_CHECK(logits.device().type() == backend, "logits must be a ", backend,
              " tensor, got ", logits.device());
  const int64_t rows = logits.size(0);
  check_output(topk_logprobs, "topk_logprobs", at::kFloat, {rows, k}, logits, "logits");
  check_output(topk_ids, "topk_ids", at::kLong, {rows, k}, logits, "logits");
  check_output(topk_entropy, "topk_entropy", at::kFloat, {rows}, logits, "logits");
  check_output(entropy, "entropy", at::kFloat, {rows}, logits, "logits");
  check_output(logsumexp, "logsumexp", at::kFloat, {rows}, logits, "logits");
  return temperature_f;
}

// The functional draft_topk_entropy of both backends: the outputs are
// allocated from logits' shape and k alone (never from data, so it is
// capture-safe) on logits' device, then filled by the backend's
// draft_topk_entropy_out. The _out implementation is a template argument so
// that each backend registers draft_topk_entropy_functional<its _out> directly.
template <auto write_outputs>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
draft_topk_entropy_functional(const at::Tensor& logits, int64_t k, double temperature) {
  check_draft_topk_entropy_args(logits, k, temperature);
  const int64_t rows = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor topk_logprobs = at::empty({rows, k}, f32);
  at::Tensor topk_ids = at::empty({rows, k}, logits.options().dtype(at::kLong));
  at::Tensor topk_entropy = at::empty({rows}, f32);
  at::Tensor entropy = at::empty({rows}, f32);
  at::Tensor logsumexp = at::empty({rows}, f32);
  write_outputs(logits, k, temperature, topk_logprobs, topk_ids, topk_entropy, entropy,
                logsumexp);
  return {topk_logprobs, topk_ids, topk_entropy, entropy, logsumexp};
}

}  // namespace heterospec

// Argument checks of fused_verify shared by the CPU and CUDA bindings: ranks,
// dtypes, shapes and devices (metadata only; never reads tensor data, so it is
// safe under CUDA-graph capture). Data-dependent checks (NaN logits, malformed
// trees, out-of-range candidates / uniforms / sampling parameters) are done by
// the kernels: ValueError on CPU, sentinel outputs on CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <optional>
#include <tuple>

#include "check.h"

namespace heterospec {

// target_logits [B, N, V] float32/float16/bfloat16 (any strides); candidates,
// parents [B, N] int64; temperature [B] float32; top_k [B] int64; top_p [B]
// float32; uniforms [B, N] float32; draft_probs optional [B, N, V] float32.
// N >= 1 (the root) and V >= 1. Everything on target_logits' device.
inline void check_fused_verify_args(const at::Tensor& target_logits,
                                    const at::Tensor& candidates,
                                    const at::Tensor& parents,
                                    const at::Tensor& temperature,
                                    const at::Tensor& top_k,
                                    const at::Tensor& top_p,
                                    const at::Tensor& uniforms,
                                    const std::optional<at::Tensor>& draft_probs) {
  HX_CHECK_DIM(target_logits, 3);
  HX_CHECK_LOGIT_DTYPE(target_logits);
  const int64_t batch = target_logits.size(0);
  const int64_t nodes = target_logits.size(1);
  const int64_t vocab = target_logits.size(2);
  TORCH_CHECK(nodes >= 1, "target_logits.size(1) (tree nodes N) must be >= 1 (the root), got ",
              nodes);
  TORCH_CHECK(vocab >= 1, "target_logits.size(2) (vocab V) must be >= 1, got ", vocab);

  HX_CHECK_DIM(candidates, 2);
  HX_CHECK_DTYPE(candidates, at::kLong);
  HX_CHECK_SIZE(candidates, 0, batch);
  HX_CHECK_SIZE(candidates, 1, nodes);
  HX_CHECK_SAME_DEVICE(candidates, target_logits);

  HX_CHECK_DIM(parents, 2);
  HX_CHECK_DTYPE(parents, at::kLong);
  HX_CHECK_SIZE(parents, 0, batch);
  HX_CHECK_SIZE(parents, 1, nodes);
  HX_CHECK_SAME_DEVICE(parents, target_logits);

  HX_CHECK_DIM(temperature, 1);
  HX_CHECK_DTYPE(temperature, at::kFloat);
  HX_CHECK_SIZE(temperature, 0, batch);
  HX_CHECK_SAME_DEVICE(temperature, target_logits);

  HX_CHECK_DIM(top_k, 1);
  HX_CHECK_DTYPE(top_k, at::kLong);
  HX_CHECK_SIZE(top_k, 0, batch);
  HX_CHECK_SAME_DEVICE(top_k, target_logits);

  HX_CHECK_DIM(top_p, 1);
  HX_CHECK_DTYPE(top_p, at::kFloat);
  HX_CHECK_SIZE(top_p, 0, batch);
  HX_CHECK_SAME_DEVICE(top_p, target_logits);

  HX_CHECK_DIM(uniforms, 2);
  HX_CHECK_DTYPE(uniforms, at::kFloat);
  HX_CHECK_SIZE(uniforms, 0, batch);
  HX_CHECK_SIZE(uniforms, 1, nodes);
  HX_CHECK_SAME_DEVICE(uniforms, target_logits);

  if (draft_probs.has_value()) {
    const at::Tensor& q = *draft_probs;
    TORCH_CHECK(q.dim() == 3, "draft_probs must be a 3-D tensor, got ", q.dim(),
                "-D with shape ", hx_shape(q));
    TORCH_CHECK(q.scalar_type() == at::kFloat, "draft_probs must have dtype float32, got ",
                q.scalar_type());
    TORCH_CHECK(q.size(0) == batch && q.size(1) == nodes && q.size(2) == vocab,
                "draft_probs must have the shape of target_logits ", hx_shape(target_logits),
                ", got ", hx_shape(q));
    TORCH_CHECK(q.device() == target_logits.device(),
                "draft_probs and target_logits must be on the same device, got ", q.device(),
                " and ", target_logits.device());
  }
}

// Every metadata check of fused_verify_out: the inputs as fused_verify checks
// them, then the outputs: out_tokens, accepted_nodes [B, N] int64 and
// num_accepted [B] int64 on target_logits' device (any strides).
inline void check_fused_verify_out_args(const at::Tensor& target_logits,
                                        const at::Tensor& candidates, const at::Tensor& parents,
                                        const at::Tensor& temperature, const at::Tensor& top_k,
                                        const at::Tensor& top_p, const at::Tensor& uniforms,
                                        const std::optional<at::Tensor>& draft_probs,
                                        const at::Tensor& out_tokens,
                                        const at::Tensor& accepted_nodes,
                                        const at::Tensor& num_accepted) {
  check_fused_verify_args(target_logits, candidates, parents, temperature, top_k, top_p,
                          uniforms, draft_probs);
  const int64_t batch = target_logits.size(0);
  const int64_t nodes = target_logits.size(1);
  // Any strides: the bindings write through contiguous temporaries (FusedVerifyOutputs).
  constexpr bool kMustBeContiguous = false;
  check_output(out_tokens, "out_tokens", at::kLong, {batch, nodes}, target_logits,
               "target_logits", kMustBeContiguous);
  check_output(accepted_nodes, "accepted_nodes", at::kLong, {batch, nodes}, target_logits,
               "target_logits", kMustBeContiguous);
  check_output(num_accepted, "num_accepted", at::kLong, {batch}, target_logits, "target_logits",
               kMustBeContiguous);
}

// Logits and draft_probs are read through their batch and node strides; the
// vocab dimension must be contiguous for the row scans of both backends.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.stride(2) == 1 ? t : t.contiguous();
}

// The outputs of fused_verify_out as the kernels write them: each caller
// buffer itself when it is contiguous, else a contiguous temporary that
// copy_back() copies into the caller's strided buffer after the kernel.
struct FusedVerifyOutputs {
  at::Tensor out_tokens;
  at::Tensor accepted_nodes;
  at::Tensor num_accepted;

  static at::Tensor writable(const at::Tensor& out) {
    return out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  }
  FusedVerifyOutputs(const at::Tensor& tokens, const at::Tensor& nodes, const at::Tensor& num)
      : out_tokens(writable(tokens)), accepted_nodes(writable(nodes)),
        num_accepted(writable(num)) {}

  void copy_back(at::Tensor& tokens, at::Tensor& nodes, at::Tensor& num) const {
    if (!out_tokens.is_same(tokens)) tokens.copy_(out_tokens);
    if (!accepted_nodes.is_same(nodes)) nodes.copy_(accepted_nodes);
    if (!num_accepted.is_same(num)) num.copy_(num_accepted);
  }
};

// The functional fused_verify of both backends: the outputs are allocated from
// target_logits' shape alone (never from data, so it is capture-safe) on its
// device, then filled by the backend's fused_verify_out. The _out
// implementation is a template argument so that each backend registers
// fused_verify_functional<its fused_verify_out> directly.
template <auto write_outputs>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_verify_functional(
    const at::Tensor& target_logits, const at::Tensor& candidates, const at::Tensor& parents,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& uniforms, const std::optional<at::Tensor>& draft_probs) {
  check_fused_verify_args(target_logits, candidates, parents, temperature, top_k, top_p,
                          uniforms, draft_probs);
  const int64_t batch = target_logits.size(0), nodes = target_logits.size(1);
  const auto opts = target_logits.options().dtype(at::kLong);
  at::Tensor out_tokens = at::empty({batch, nodes}, opts);
  at::Tensor accepted_nodes = at::empty({batch, nodes}, opts);
  at::Tensor num_accepted = at::empty({batch}, opts);
  write_outputs(target_logits, candidates, parents, temperature, top_k, top_p, uniforms,
                draft_probs, out_tokens, accepted_nodes, num_accepted);
  return {out_tokens, accepted_nodes, num_accepted};
}

}  // namespace heterospec

// CUDA binding of fused_verify / fused_verify_out: the checks shared with the
// CPU binding (fused_verify_checks.h), device guard, current stream, one launch.
// Data-dependent errors never sync to raise: the kernel writes the sentinel
// (num_accepted 0, every slot -1) for that request instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "check.h"
#include "core/macros.h"
#include "cuda/fused_verify.cuh"
#include "fused_verify_checks.h"

namespace heterospec {
namespace {

void fused_verify_out_cuda(const at::Tensor& target_logits, const at::Tensor& candidates,
                           const at::Tensor& parents, const at::Tensor& temperature,
                           const at::Tensor& top_k, const at::Tensor& top_p,
                           const at::Tensor& uniforms,
                           const std::optional<at::Tensor>& draft_probs, at::Tensor& out_tokens,
                           at::Tensor& accepted_nodes, at::Tensor& num_accepted) {
  check_fused_verify_out_args(target_logits, candidates, parents, temperature, top_k, top_p,
                              uniforms, draft_probs, out_tokens, accepted_nodes, num_accepted);
  TORCH_CHECK(target_logits.is_cuda(), "target_logits must be a CUDA tensor, got ",
              target_logits.device());
  const int64_t batch = target_logits.size(0);
  const int64_t nodes = target_logits.size(1);
  const int64_t vocab = target_logits.size(2);
  TORCH_CHECK(nodes <= cuda::kFusedVerifyMaxNodes, "target_logits.size(1) (tree nodes N) must be <= ",
              cuda::kFusedVerifyMaxNodes, " on CUDA, got ", nodes);
  TORCH_CHECK(vocab <= cuda::kFusedVerifyMaxVocab, "target_logits.size(2) (vocab V) must be <= ",
              cuda::kFusedVerifyMaxVocab, " on CUDA, got ", vocab);

  const c10::cuda::OptionalCUDAGuard guard(target_logits.device());
  const at::Tensor logits = rows_contiguous(target_logits);
  std::optional<at::Tensor> q;
  if (draft_probs.has_value()) q = rows_contiguous(*draft_probs);
  const at::Tensor cand = candidates.contiguous();
  const at::Tensor par = parents.contiguous();
  const at::Tensor temp = temperature.contiguous();
  const at::Tensor k = top_k.contiguous();
  const at::Tensor p = top_p.contiguous();
  const at::Tensor u = uniforms.contiguous();
  FusedVerifyOutputs out(out_tokens, accepted_nodes, num_accepted);
  // Real-q residual rows p' (sized from shapes only; fully rewritten before use).
  at::Tensor workspace;
  if (q.has_value()) workspace = at::empty({batch, vocab}, logits.options().dtype(at::kFloat));

  cuda::FusedVerifyArgs args{};
  args.logits = logits.const_data_ptr();
  args.logits_stride_b = logits.stride(0);
  args.logits_stride_n = logits.stride(1);
  args.dtype = logit_dtype(logits, "target_logits");
  args.candidates = cand.const_data_ptr<int64_t>();
  args.parents = par.const_data_ptr<int64_t>();
  args.temperature = temp.const_data_ptr<float>();
  args.top_k = k.const_data_ptr<int64_t>();
  args.top_p = p.const_data_ptr<float>();
  args.uniforms = u.const_data_ptr<float>();
  args.draft_probs = q.has_value() ? q->const_data_ptr<float>() : nullptr;
  args.draft_stride_b = q.has_value() ? q->stride(0) : 0;
  args.draft_stride_n = q.has_value() ? q->stride(1) : 0;
  args.workspace = q.has_value() ? workspace.mutable_data_ptr<float>() : nullptr;
  args.out_tokens = out.out_tokens.mutable_data_ptr<int64_t>();
  args.accepted_nodes = out.accepted_nodes.mutable_data_ptr<int64_t>();
  args.num_accepted = out.num_accepted.mutable_data_ptr<int64_t>();
  args.batch = batch;
  args.nodes = nodes;
  args.vocab = vocab;

  const cudaError_t err =
      cuda::launch_fused_verify(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fused_verify: CUDA launch failed: ",
              cudaGetErrorString(err));
  out.copy_back(out_tokens, accepted_nodes, num_accepted);
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CUDA, m) {
  m.impl("fused_verify",
         &heterospec::fused_verify_functional<heterospec::fused_verify_out_cuda>);
  m.impl("fused_verify_out", &heterospec::fused_verify_out_cuda);
}

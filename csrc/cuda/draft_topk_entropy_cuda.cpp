// CUDA bindings of draft_topk_entropy: checks, workspace, stream, launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "cuda/draft_topk_entropy.cuh"
#include "draft_topk_entropy_checks.h"

namespace heterospec {
namespace {

core::LogitDType to_logit_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return core::LogitDType::kFloat16;
    case at::kBFloat16:
      return core::LogitDType::kBFloat16;
    default:
      return core::LogitDType::kFloat32;
  }
}

// Multiprocessor count per device, read once (cudaDeviceGetAttribute does not
// synchronise and is legal during graph capture).
int multiprocessor_count(int device) {
  static std::array<int, 64> cache{};
  if (device >= 0 && device < static_cast<int>(cache.size()) && cache[device] > 0) {
    return cache[device];
  }
  int count = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(err == cudaSuccess, "draft_topk_entropy: cudaDeviceGetAttribute failed: ",
              cudaGetErrorString(err));
  if (device >= 0 && device < static_cast<int>(cache.size())) cache[device] = count;
  return count;
}

void draft_topk_entropy_out_cuda(const at::Tensor& logits, int64_t k, double temperature,
                                 at::Tensor& topk_logprobs, at::Tensor& topk_ids,
                                 at::Tensor& topk_entropy, at::Tensor& entropy,
                                 at::Tensor& logsumexp) {
  const float temperature_f = check_draft_topk_entropy_args(logits, k, temperature);
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor, got ", logits.device());
  check_draft_topk_entropy_outs(logits, k, topk_logprobs, topk_ids, topk_entropy, entropy,
                                logsumexp);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  if (rows == 0) return;
  const int64_t vocab = logits.size(1);
  const DraftTopKEntropyPlan plan =
      plan_draft_topk_entropy(rows, vocab, k, multiprocessor_count(logits.get_device()));
  // Zeroed every call: the first bytes are the per-row tickets of split rows.
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::zeros({plan.workspace_bytes}, logits.options().dtype(at::kByte));
  }
  const cudaError_t err = launch_draft_topk_entropy(
      logits.const_data_ptr(), to_logit_dtype(logits.scalar_type()), rows, vocab,
      logits.stride(0), logits.stride(1), k, temperature_f, plan,
      workspace.defined() ? workspace.data_ptr() : nullptr, topk_logprobs.data_ptr<float>(),
      topk_ids.data_ptr<int64_t>(), topk_entropy.data_ptr<float>(), entropy.data_ptr<float>(),
      logsumexp.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "draft_topk_entropy CUDA launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(heterospec, CUDA, m) {
  m.impl("draft_topk_entropy", &draft_topk_entropy_functional<draft_topk_entropy_out_cuda>);
  m.impl("draft_topk_entropy_out", &draft_topk_entropy_out_cuda);
}

}  // namespace heterospec

// CUDA binding of draft_topk_entropy / draft_topk_entropy_out: the checks
// shared with the CPU binding, the split plan and its zeroed workspace, then
// one kernel launch on the current stream (no host sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "check.h"
#include "cuda/common.cuh"
#include "cuda/draft_topk_entropy.cuh"
#include "draft_topk_entropy_checks.h"

namespace heterospec {
namespace {

void draft_topk_entropy_out_cuda(const at::Tensor& logits, int64_t k, double temperature,
                                 at::Tensor& topk_logprobs, at::Tensor& topk_ids,
                                 at::Tensor& topk_entropy, at::Tensor& entropy,
                                 at::Tensor& logsumexp) {
  const float temperature_f = check_draft_topk_entropy_out_args(
      logits, k, temperature, c10::DeviceType::CUDA, topk_logprobs, topk_ids, topk_entropy, entropy,
      logsumexp);
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  if (rows == 0) return;
  const int64_t vocab = logits.size(1);
  cuda::DeviceInfo device;
  const cudaError_t query = cuda::cached_device_info(logits.get_device(), &device);
  TORCH_CHECK(query == cudaSuccess, "draft_topk_entropy: cudaDeviceGetAttribute failed: ",
              cudaGetErrorString(query));
  cuda::DraftTopKEntropyArgs args{};
  args.plan = cuda::plan_draft_topk_entropy(rows, vocab, k, device.sms);
  // Zeroed every call: the first bytes are the per-row tickets of split rows.
  at::Tensor workspace;
  if (args.plan.workspace_bytes > 0) {
    workspace = at::zeros({args.plan.workspace_bytes}, logits.options().dtype(at::kByte));
  }
  args.logits = logits.const_data_ptr();
  args.dtype = logit_dtype(logits, "logits");
  args.rows = rows;
  args.vocab = vocab;
  args.row_stride = logits.stride(0);
  args.col_stride = logits.stride(1);
  args.k = k;
  args.temperature = temperature_f;
  args.workspace = workspace.defined() ? workspace.mutable_data_ptr() : nullptr;
  args.topk_logprobs = topk_logprobs.mutable_data_ptr<float>();
  args.topk_ids = topk_ids.mutable_data_ptr<int64_t>();
  args.topk_entropy = topk_entropy.mutable_data_ptr<float>();
  args.entropy = entropy.mutable_data_ptr<float>();
  args.logsumexp = logsumexp.mutable_data_ptr<float>();
  const cudaError_t err =
      cuda::launch_draft_topk_entropy(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "draft_topk_entropy: CUDA launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CUDA, m) {
  m.impl("draft_topk_entropy",
         &heterospec::draft_topk_entropy_functional<heterospec::draft_topk_entropy_out_cuda>);
  m.impl("draft_topk_entropy_out", &heterospec::draft_topk_entropy_out_cuda);
}

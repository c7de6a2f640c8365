// CUDA binding of stratify / stratify_out: the checks shared with the CPU
// binding, then one launch on the current stream (no host sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/stratify.cuh"
#include "stratify_checks.h"

namespace heterospec {
namespace {

void stratify_out_cuda(const at::Tensor& step_entropy_in, const at::Tensor& confidence_in,
                       const at::Tensor& parents_in, const at::Tensor& thresholds_in,
                       const at::Tensor& policy_in, at::Tensor& path_entropy, at::Tensor& pstar,
                       at::Tensor& stratum, at::Tensor& extra_depth, at::Tensor& top_n) {
  check_stratify_out_args(step_entropy_in, confidence_in, parents_in, thresholds_in, policy_in,
                          path_entropy, pstar, stratum, extra_depth, top_n);
  TORCH_CHECK(parents_in.is_cuda(), "parents must be a CUDA tensor");
  const c10::cuda::OptionalCUDAGuard guard(parents_in.device());
  const at::Tensor step_entropy = step_entropy_in.contiguous();
  const at::Tensor confidence = confidence_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor thresholds = thresholds_in.contiguous();
  const at::Tensor policy = policy_in.contiguous();
  cuda::StratifyArgs args{};
  args.step_entropy = step_entropy.const_data_ptr<float>();
  args.confidence = confidence.const_data_ptr<float>();
  args.parents = parents.const_data_ptr<int64_t>();
  args.thresholds = thresholds.const_data_ptr<float>();
  args.policy = policy.const_data_ptr<int64_t>();
  args.batch = parents.size(0);
  args.num_nodes = parents.size(1);
  args.num_thresholds = thresholds.size(0);
  args.path_entropy = path_entropy.mutable_data_ptr<float>();
  args.pstar = pstar.mutable_data_ptr<int64_t>();
  args.stratum = stratum.mutable_data_ptr<int64_t>();
  args.extra_depth = extra_depth.mutable_data_ptr<int64_t>();
  args.top_n = top_n.mutable_data_ptr<int64_t>();
  const cudaError_t err =
      cuda::launch_stratify(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "stratify: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CUDA, m) {
  m.impl("stratify", &heterospec::stratify_functional<heterospec::stratify_out_cuda>);
  m.impl("stratify_out", &heterospec::stratify_out_cuda);
}

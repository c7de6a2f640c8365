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
  check_stratify_args(step_entropy_in, confidence_in, parents_in, thresholds_in, policy_in);
  check_stratify_outputs(parents_in, path_entropy, pstar, stratum, extra_depth, top_n);
  TORCH_CHECK(parents_in.is_cuda(), "parents must be a CUDA tensor");
  const c10::cuda::OptionalCUDAGuard guard(parents_in.device());
  const at::Tensor step_entropy = step_entropy_in.contiguous();
  const at::Tensor confidence = confidence_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor thresholds = thresholds_in.contiguous();
  const at::Tensor policy = policy_in.contiguous();
  const cudaError_t err = launch_stratify(
      step_entropy.data_ptr<float>(), confidence.data_ptr<float>(), parents.data_ptr<int64_t>(),
      thresholds.data_ptr<float>(), policy.data_ptr<int64_t>(), parents.size(0),
      parents.size(1), thresholds.size(0), path_entropy.data_ptr<float>(),
      pstar.data_ptr<int64_t>(), stratum.data_ptr<int64_t>(), extra_depth.data_ptr<int64_t>(),
      top_n.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "stratify: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CUDA, m) {
  m.impl("stratify", &heterospec::stratify_functional<heterospec::stratify_out_cuda>);
  m.impl("stratify_out", &heterospec::stratify_out_cuda);
}

// CUDA binding of build_tree / build_tree_out: the checks shared with the CPU
// binding, then one launch on the current stream (no host sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "build_tree_checks.h"
#include "core/build_tree.h"
#include "cuda/build_tree.cuh"

namespace heterospec {
namespace {

void build_tree_out_cuda(const at::Tensor& pool_parents_in, const at::Tensor& pool_scores_in,
                         const at::Tensor& pool_tokens_in, const at::Tensor& top_n_in,
                         at::Tensor& selected, at::Tensor& tokens, at::Tensor& parents,
                         at::Tensor& depth, at::Tensor& mask, at::Tensor& packed_mask,
                         at::Tensor& first_child, at::Tensor& next_sibling, at::Tensor& retrieve,
                         at::Tensor& num_nodes) {
  const int64_t n_max = check_build_tree_out_args(
      pool_parents_in, pool_scores_in, pool_tokens_in, top_n_in, selected, tokens, parents, depth,
      mask, packed_mask, first_child, next_sibling, retrieve, num_nodes);
  TORCH_CHECK(pool_parents_in.is_cuda(), "pool_parents must be a CUDA tensor");
  const c10::cuda::OptionalCUDAGuard guard(pool_parents_in.device());
  const at::Tensor pool_parents = pool_parents_in.contiguous();
  const at::Tensor pool_scores = pool_scores_in.contiguous();
  const at::Tensor pool_tokens = pool_tokens_in.contiguous();
  const at::Tensor top_n = top_n_in.contiguous();
  cuda::BuildTreeArgs args{};
  args.pool_parents = pool_parents.data_ptr<int64_t>();
  args.pool_scores = pool_scores.data_ptr<float>();
  args.pool_tokens = pool_tokens.data_ptr<int64_t>();
  args.top_n = top_n.data_ptr<int64_t>();
  args.batch = pool_parents.size(0);
  args.num_pool = pool_parents.size(1);
  args.n_max = n_max;
  args.selected = selected.data_ptr<int64_t>();
  args.tokens = tokens.data_ptr<int64_t>();
  args.parents = parents.data_ptr<int64_t>();
  args.depth = depth.data_ptr<int64_t>();
  args.mask = mask.data_ptr<bool>();
  args.packed_mask = packed_mask.data_ptr<int32_t>();
  args.first_child = first_child.data_ptr<int64_t>();
  args.next_sibling = next_sibling.data_ptr<int64_t>();
  args.retrieve = retrieve.data_ptr<int64_t>();
  args.num_nodes = num_nodes.data_ptr<int64_t>();
  const cudaError_t err =
      cuda::launch_build_tree(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "build_tree: CUDA launch failed (pool_parents.size(1) = ",
              args.num_pool, ", n_max = ", n_max, " need ",
              cuda::build_tree_shared_bytes(args.num_pool, n_max),
              " bytes of shared memory per block): ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CUDA, m) {
  m.impl("build_tree", &heterospec::build_tree_functional<heterospec::build_tree_out_cuda>);
  m.impl("build_tree_out", &heterospec::build_tree_out_cuda);
}

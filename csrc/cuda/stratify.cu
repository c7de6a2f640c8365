// stratify on CUDA: one CTA per request. The threads validate the parent row
// and reduce the P* argmax (a max over core::rank_key); thread 0 then walks
// P*'s path (O(depth)) and sums H in the same root-down float32 order as the
// CPU, so both backends agree bit for bit.
#include <cuda_runtime.h>

#include <cstdint>

#include "core/stratify.h"
#include "core/tree.h"
#include "cuda/common.cuh"
#include "cuda/stratify.cuh"

namespace heterospec {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Path levels summed per chunk; deeper paths take extra passes (see
// core::path_entropy), never extra memory.
constexpr int64_t kPathCapacity = 512;

__global__ void __launch_bounds__(kThreads)
    stratify_kernel(const float* __restrict__ step_entropy, const float* __restrict__ confidence,
                    const int64_t* __restrict__ parents, const float* __restrict__ thresholds,
                    const int64_t* __restrict__ policy, int64_t num_nodes,
                    int64_t num_thresholds, float* __restrict__ path_entropy,
                    int64_t* __restrict__ pstar, int64_t* __restrict__ stratum,
                    int64_t* __restrict__ extra_depth, int64_t* __restrict__ top_n) {
  __shared__ uint64_t warp_best[kWarps];
  __shared__ int64_t path_buffer[kPathCapacity];
  const int64_t b = blockIdx.x;
  const int64_t row = b * num_nodes;
  const int64_t* par = parents + row;
  const float* conf = confidence + row;

  bool bad = false;
  uint64_t best = 0;
  for (int64_t i = threadIdx.x; i < num_nodes; i += kThreads) {
    if (core::check_tree_node(par, i) != core::TreeDefect::kNone) {
      bad = true;
    } else if (i > 0 && par[i] >= 0) {
      const uint64_t key = core::rank_key(conf[i], i);
      best = key > best ? key : best;
    }
  }
  const bool malformed = __syncthreads_or(bad) != 0;
  best = warp_max(best);
  if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = best;
  __syncthreads();
  if (threadIdx.x != 0) return;

  if (malformed) {
    path_entropy[b] = __int_as_float(0x7FC00000);  // quiet NaN
    pstar[b] = stratum[b] = core::kStratifyInvalidIndex;
    extra_depth[b] = top_n[b] = 0;
    return;
  }
  for (int w = 1; w < kWarps; ++w) best = warp_best[w] > best ? warp_best[w] : best;
  const int64_t node = best == 0 ? 0 : core::rank_key_index(best);
  const float h = core::path_entropy(par, step_entropy + row, node, path_buffer, kPathCapacity);
  const int64_t s = core::stratum_of(h, thresholds, num_thresholds);
  path_entropy[b] = h;
  pstar[b] = node;
  stratum[b] = s;
  extra_depth[b] = policy[2 * s];
  top_n[b] = policy[2 * s + 1];
}

}  // namespace

cudaError_t launch_stratify(const StratifyArgs& args, cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  if (args.batch > 0x7FFFFFFF) return cudaErrorInvalidValue;
  stratify_kernel<<<static_cast<unsigned>(args.batch), kThreads, 0, stream>>>(
      args.step_entropy, args.confidence, args.parents, args.thresholds, args.policy,
      args.num_nodes, args.num_thresholds, args.path_entropy, args.pstar, args.stratum,
      args.extra_depth, args.top_n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace heterospec

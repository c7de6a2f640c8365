// Torch-free launcher of the stratify CUDA kernel (see csrc/cuda/stratify.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace heterospec {
namespace cuda {

// Raw views of the arguments of heterospec::stratify_out; every buffer is a
// contiguous device buffer.
struct StratifyArgs {
  const float* step_entropy;  // [batch, num_nodes]
  const float* confidence;    // [batch, num_nodes]
  const int64_t* parents;     // [batch, num_nodes]
  const float* thresholds;    // [num_thresholds]
  const int64_t* policy;      // [num_thresholds + 1, 2]
  int64_t batch;
  int64_t num_nodes;
  int64_t num_thresholds;
  float* path_entropy;   // [batch]
  int64_t* pstar;        // [batch]
  int64_t* stratum;      // [batch]
  int64_t* extra_depth;  // [batch]
  int64_t* top_n;        // [batch]
};

// One CTA per request, one launch on `stream`, no host synchronisation.
// Malformed parent rows get the sentinels of core/stratify.h. batch == 0 is a
// no-op.
cudaError_t launch_stratify(const StratifyArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace heterospec

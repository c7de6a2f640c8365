// Torch-free launcher of the stratify CUDA kernel (see csrc/cuda/stratify.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace heterospec {

// One CTA per request. All pointers are contiguous device buffers:
// step_entropy / confidence / parents [batch, num_nodes], thresholds
// [num_thresholds], policy [num_thresholds + 1, 2], outputs [batch].
// Malformed parent rows get the sentinels of core/stratify.h. batch == 0 is a
// no-op.
cudaError_t launch_stratify(const float* step_entropy, const float* confidence,
                            const int64_t* parents, const float* thresholds,
                            const int64_t* policy, int64_t batch, int64_t num_nodes,
                            int64_t num_thresholds, float* path_entropy, int64_t* pstar,
                            int64_t* stratum, int64_t* extra_depth, int64_t* top_n,
                            cudaStream_t stream);

}  // namespace heterospec

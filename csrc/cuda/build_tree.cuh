// Torch-free launcher of the build_tree CUDA kernel (see csrc/cuda/build_tree.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace heterospec {
namespace cuda {

// Dynamic shared memory one build_tree CTA needs: the pool's taken bitset plus
// five int32 arrays of n_max entries. launch_build_tree checks it against the
// device's per-block limit and returns cudaErrorInvalidValue when it does not
// fit; the binding then names this size in its error.
inline int64_t build_tree_shared_bytes(int64_t num_pool, int64_t n_max) {
  return 4 * ((num_pool + 31) / 32 + 5 * n_max);
}

// Raw views of the arguments of heterospec::build_tree_out; every buffer is a
// contiguous device buffer.
struct BuildTreeArgs {
  const int64_t* pool_parents;  // [batch, num_pool]
  const float* pool_scores;     // [batch, num_pool]
  const int64_t* pool_tokens;   // [batch, num_pool]
  const int64_t* top_n;         // [batch]
  int64_t batch;
  int64_t num_pool;
  int64_t n_max;
  int64_t* selected;      // [batch, n_max]
  int64_t* tokens;        // [batch, n_max]
  int64_t* parents;       // [batch, n_max]
  int64_t* depth;         // [batch, n_max]
  bool* mask;             // [batch, n_max, n_max]
  int32_t* packed_mask;   // [batch, n_max, ceil(n_max / 32)]
  int64_t* first_child;   // [batch, n_max]
  int64_t* next_sibling;  // [batch, n_max]
  int64_t* retrieve;      // [batch, n_max, n_max]
  int64_t* num_nodes;     // [batch]
};

// One CTA per request on the current device, one launch on `stream`, no host
// synchronisation. A malformed pool row is emitted as an empty tree
// (num_nodes = 0, all padding). Returns cudaErrorInvalidValue when
// build_tree_shared_bytes exceeds what the device allows per block.
// batch == 0 is a no-op.
cudaError_t launch_build_tree(const BuildTreeArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace heterospec

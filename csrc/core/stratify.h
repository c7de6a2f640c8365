// Torch-free per-request semantics of the stratify op, shared by the CPU and
// CUDA kernels so both produce bit-identical results:
//   - P* = the real non-root node with the highest confidence (rank_key in
//     core/tree.h: NaN as -inf, ties to the lowest index); 0 for a root-only
//     tree.
//   - H(P*) = step entropies of the non-root path nodes, added in float32 from
//     the root down, exactly the recurrence H(i) = H(parent(i)) + e_i.
//   - stratum = number of thresholds <= H(P*); the last stratum for NaN.
#pragma once

#include <cstdint>

#include "core/macros.h"
#include "core/tree.h"

namespace heterospec {
namespace core {

// What the CUDA kernel writes for a request whose parents row is malformed
// (path_entropy is NaN, and extra_depth = top_n = 0).
constexpr int64_t kStratifyInvalidIndex = -1;

// Number of thresholds <= h; num_thresholds (the last stratum) when h is NaN.
// A linear count, so it is well defined even for unsorted thresholds (the CPU
// binding rejects those; the CUDA path cannot raise).
HX_HD_INLINE int64_t stratum_of(float h, const float* thresholds, int64_t num_thresholds) {
  if (h != h) return num_thresholds;
  int64_t count = 0;
  for (int64_t j = 0; j < num_thresholds; ++j) count += thresholds[j] <= h ? 1 : 0;
  return count;
}

// Edges from node to the root of a validated row (0 for the root). The walk
// strictly decreases the index, so it takes at most `node` steps.
HX_HD_INLINE int64_t node_depth(const int64_t* parents, int64_t node) {
  int64_t depth = 0;
  for (int64_t v = node; v > 0 && depth < node; v = parents[v]) ++depth;
  return depth;
}

// H(node) of a validated row: the float32 sum of step_entropy over the
// non-root nodes of the root-to-node path, accumulated from the root down.
// `buffer` holds `capacity` >= 1 node indices; deeper paths are summed in
// chunks of `capacity` levels from the top, which keeps the summation order
// (and so the bits) independent of the capacity at O(depth^2 / capacity) cost.
HX_HD_INLINE float path_entropy(const int64_t* parents, const float* step_entropy, int64_t node,
                                int64_t* buffer, int64_t capacity) {
  const int64_t depth = node_depth(parents, node);
  float h = 0.0f;
  for (int64_t top = 1; top <= depth; top += capacity) {
    const int64_t bottom = (top + capacity - 1 < depth) ? top + capacity - 1 : depth;
    int64_t v = node;
    for (int64_t d = depth; d > bottom; --d) v = parents[v];
    for (int64_t d = bottom; d >= top; --d) {
      buffer[d - top] = v;
      v = parents[v];
    }
    for (int64_t d = top; d <= bottom; ++d) h += step_entropy[buffer[d - top]];
  }
  return h;
}

}  // namespace core
}  // namespace heterospec

// Torch-free per-tree semantics of the build_tree op, shared by the CPU and
// CUDA kernels. Selection order is core::rank_key over pool_scores (score
// desc, pool index asc, NaN as -inf). After selection the tree is described
// by `sel_parent` (index of the parent within the selection, -1 for the root);
// selected nodes are in ascending pool index, so sel_parent[j] < j.
#pragma once

#include <cstdint>

#include "core/macros.h"
#include "core/tree.h"

namespace heterospec {
namespace core {

// int32 words per packed mask row.
HX_HD_INLINE int64_t packed_mask_words(int64_t n_max) { return (n_max + 31) / 32; }

// Nodes to keep (root included): top_n clamped to [1, min(n_max, valid_nodes)].
HX_HD_INLINE int64_t clamp_tree_size(int64_t top_n, int64_t n_max, int64_t valid_nodes) {
  const int64_t upper = n_max < valid_nodes ? n_max : valid_nodes;
  if (top_n > upper) top_n = upper;
  return top_n < 1 ? 1 : top_n;
}

// Writes the `num_words` packed words of mask row `row`: bit j % 32 of word
// j / 32 is set iff j is `row` or one of its ancestors. Rows >= num_nodes are
// padding and attend to themselves only. Ancestors have decreasing indices,
// so the words are filled from the last down in one walk of O(depth + words);
// the walk stops on any non-decreasing parent, so garbage cannot loop.
template <typename ParentT>
HX_HD_INLINE void write_packed_mask_row(int64_t row, int64_t num_nodes, const ParentT* sel_parent,
                                        int32_t* words, int64_t num_words) {
  int64_t word = num_words - 1;
  uint32_t bits = 0;
  int64_t v = row;
  while (v >= 0) {
    const int64_t w = v >> 5;
    while (word > w) {
      words[word--] = static_cast<int32_t>(bits);
      bits = 0;
    }
    bits |= 1u << (v & 31);
    if (row >= num_nodes) break;
    const int64_t parent = static_cast<int64_t>(sel_parent[v]);
    if (parent >= v) break;
    v = parent;
  }
  while (word >= 0) {
    words[word--] = static_cast<int32_t>(bits);
    bits = 0;
  }
}

// Writes the root-to-leaf path of `leaf` (at depth `depth`) into path[0..depth].
template <typename ParentT, typename OutT>
HX_HD_INLINE void write_root_path(int64_t leaf, int64_t depth, const ParentT* sel_parent,
                                  OutT* path) {
  int64_t v = leaf;
  for (int64_t d = depth; d >= 0 && v >= 0; --d) {
    path[d] = static_cast<OutT>(v);
    v = static_cast<int64_t>(sel_parent[v]);
  }
}

}  // namespace core
}  // namespace heterospec

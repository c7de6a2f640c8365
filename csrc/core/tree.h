// Torch-free tree helpers shared by stratify, build_tree and fused_verify.
//
// Tree convention (parent-index form, one row per request): node 0 is the
// root with parents[0] == -1; for i > 0, parents[i] is in [0, i) for a real
// node and -1 for a padding slot. A real node whose parent is a padding slot
// is malformed. Because every real parent precedes its child, walks towards
// the root strictly decrease the node index and end within i steps.
//
// API (all usable from host code and CUDA device code):
//   check_tree_node(parents, i)      -> TreeDefect of node i (O(1), parallel-safe)
//   first_malformed_node(parents, m) -> lowest bad node, or -1 for a valid tree
//   is_real_node(parents, i)         -> node 0 or a node with a parent
//   rank_key(value, i) / rank_key_index(key)
//                                    -> one integer ordering nodes by
//                                       (value desc, index asc), NaN as -inf
#pragma once

#include <cstdint>

#include "core/macros.h"

namespace heterospec {
namespace core {

// Why a node breaks the tree convention; kNone for a well-formed node.
enum class TreeDefect : int32_t {
  kNone = 0,
  kRootHasParent = 1,      // parents[0] != -1
  kParentOutOfRange = 2,   // parents[i] < -1 or parents[i] >= i
  kParentIsPadding = 3,    // parents[i] = p > 0 but parents[p] == -1
};

// Reads parents[node] and, for a real non-root node, parents[parents[node]]
// (always in bounds: that index is < node).
HX_HD_INLINE TreeDefect check_tree_node(const int64_t* parents, int64_t node) {
  const int64_t parent = parents[node];
  if (node == 0) {
    return parent == -1 ? TreeDefect::kNone : TreeDefect::kRootHasParent;
  }
  if (parent == -1) return TreeDefect::kNone;  // padding slot
  if (parent < -1 || parent >= node) return TreeDefect::kParentOutOfRange;
  if (parent > 0 && parents[parent] == -1) return TreeDefect::kParentIsPadding;
  return TreeDefect::kNone;
}

// Lowest malformed node of a num_nodes-long parent row, or -1 if the row is a
// valid tree. Checking each node against its parent's own parent entry is
// enough: by induction every real node then has a real ancestor chain to 0.
HX_HD_INLINE int64_t first_malformed_node(const int64_t* parents, int64_t num_nodes) {
  for (int64_t i = 0; i < num_nodes; ++i) {
    if (check_tree_node(parents, i) != TreeDefect::kNone) return i;
  }
  return -1;
}

// Meaningful for rows that passed validation.
HX_HD_INLINE bool is_real_node(const int64_t* parents, int64_t node) {
  return node == 0 || parents[node] >= 0;
}

// Human-readable defect, for host-side error messages.
inline const char* tree_defect_message(TreeDefect defect) {
  switch (defect) {
    case TreeDefect::kNone: return "well-formed";
    case TreeDefect::kRootHasParent: return "the root (node 0) must have parent -1";
    case TreeDefect::kParentOutOfRange:
      return "a node's parent must be -1 (padding) or a lower node index";
    case TreeDefect::kParentIsPadding: return "a real node's parent is a padding slot";
  }
  return "unknown defect";
}

// Ranking key: rank_key(a, i) > rank_key(b, j) iff a is preferred to b, where
// NaN counts as -inf, -0.0 equals +0.0, and equal values prefer the lower
// index. 0 is never a key, so callers can use it as "no candidate". A plain
// unsigned max over keys is therefore the tie-broken argmax (and works as a
// warp-shuffle reduction). Requires 0 <= index < 2^32 - 1.
HX_HD_INLINE uint64_t rank_key(float value, int64_t index) {
  uint32_t bits = float_bits(value);
  if (value != value) bits = 0xFF800000u;  // NaN -> -inf
  if (value == 0.0f) bits = 0u;            // -0 -> +0
  bits = float_order_key(bits);
  const uint32_t index_part = 0xFFFFFFFFu - static_cast<uint32_t>(index);
  return (static_cast<uint64_t>(bits) << 32) | index_part;
}

HX_HD_INLINE int64_t rank_key_index(uint64_t key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull));
}

}  // namespace core
}  // namespace heterospec

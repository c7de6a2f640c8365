// Helpers shared by the CPU kernels of the tree ops (stratify, build_tree,
// fused_verify): how requests are spread over at::parallel_for, and the one
// error a malformed parent row raises.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "check.h"
#include "core/tree.h"

namespace heterospec {
namespace cpu {

// Tree nodes per parallel_for task. A request costs O(nodes), so a task takes
// whole requests until it holds about this many nodes: waking the thread pool
// costs more than a few small requests.
constexpr int64_t kParallelNodes = 32768;

// parallel_for grain (requests per task) for requests of `nodes_per_request`.
inline int64_t request_grain(int64_t nodes_per_request) {
  return std::max<int64_t>(1, kParallelNodes / std::max<int64_t>(1, nodes_per_request));
}

// Raises the ValueError of a malformed parent row, worded the same for every
// op: "<op>: <argument> of request <b> is not a valid tree: node <i> has parent
// <p> (<why>)". `node` is core::first_malformed_node(parents, num_nodes).
[[noreturn]] inline void raise_malformed_tree(const char* op, const char* argument,
                                              int64_t request, const int64_t* parents,
                                              int64_t node) {
  HX_CHECK_VALUE(false, op, ": ", argument, " of request ", request,
                 " is not a valid tree: node ", node, " has parent ", parents[node], " (",
                 core::tree_defect_message(core::check_tree_node(parents, node)), ")");
  __builtin_unreachable();
}

// For kernels that validate requests inside at::parallel_for and record each
// request's first malformed node in `bad_node` (-1: valid): raises for the
// lowest bad request, so the error names the same request whatever the
// scheduling. `parents` is the contiguous [B, num_nodes] parent tensor.
inline void raise_lowest_malformed_tree(const char* op, const char* argument,
                                        const std::vector<int64_t>& bad_node,
                                        const int64_t* parents, int64_t num_nodes) {
  for (size_t b = 0; b < bad_node.size(); ++b) {
    if (bad_node[b] < 0) continue;
    const int64_t request = static_cast<int64_t>(b);
    raise_malformed_tree(op, argument, request, parents + request * num_nodes, bad_node[b]);
  }
}

}  // namespace cpu
}  // namespace heterospec

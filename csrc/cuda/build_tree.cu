// build_tree on CUDA: one CTA per request.
//  1. validate the pool row and count its real nodes (core/tree.h);
//  2. best-first selection: n - 1 rounds of a block-wide argmax of
//     core::rank_key over the selectable nodes (parent taken, self not), with
//     the taken set as a bitset in shared memory;
//  3. sort the selection by rank counting, map parents to selection indices by
//     binary search, then depths, child lists, packed mask rows (one thread
//     per row, core/build_tree.h), the bool mask from the packed words, and
//     the retrieve rows of the leaves.
// Every output element of the request is written; offsets are int64.
#include <cuda_runtime.h>

#include <cstdint>

#include "core/build_tree.h"
#include "core/tree.h"
#include "cuda/build_tree.cuh"
#include "cuda/common.cuh"

namespace heterospec {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kDefaultSharedLimit = 48 * 1024;

__device__ __forceinline__ bool is_taken(const uint32_t* bits, int64_t node) {
  return (bits[node >> 5] >> (node & 31)) & 1u;
}

__global__ void __launch_bounds__(kThreads) build_tree_kernel(const BuildTreeArgs args) {
  extern __shared__ uint64_t shared_raw[];
  __shared__ uint64_t warp_partial[kWarps];
  __shared__ int32_t tree_size;

  const int64_t b = blockIdx.x;
  const int64_t num_pool = args.num_pool;
  const int64_t n_max = args.n_max;
  const int64_t words = core::packed_mask_words(n_max);
  const int64_t* par = args.pool_parents + b * num_pool;
  const float* scores = args.pool_scores + b * num_pool;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  uint32_t* taken = reinterpret_cast<uint32_t*>(shared_raw);
  int32_t* pick_order = reinterpret_cast<int32_t*>(taken + (num_pool + 31) / 32);
  int32_t* sorted = pick_order + n_max;      // selected pool indices, ascending
  int32_t* sel_parent = sorted + n_max;      // parent's index in `sorted`, -1 root
  int32_t* sel_depth = sel_parent + n_max;
  int32_t* sel_first_child = sel_depth + n_max;

  // 1. Validate and count real nodes.
  bool bad = false;
  uint64_t real = 0;
  for (int64_t i = tid; i < num_pool; i += kThreads) {
    if (core::check_tree_node(par, i) != core::TreeDefect::kNone) bad = true;
    real += core::is_real_node(par, i) ? 1 : 0;
  }
  for (int64_t w = tid; w < (num_pool + 31) / 32; w += kThreads) taken[w] = 0;
  const bool malformed = __syncthreads_or(bad) != 0;
  real = warp_sum(real);
  if (lane == 0) warp_partial[warp] = real;
  __syncthreads();
  if (tid == 0) {
    uint64_t valid = 0;
    for (int w = 0; w < kWarps; ++w) valid += warp_partial[w];
    tree_size = malformed ? 0
                          : static_cast<int32_t>(core::clamp_tree_size(
                                args.top_n[b], n_max, static_cast<int64_t>(valid)));
    taken[0] |= 1u;
    pick_order[0] = 0;
  }
  __syncthreads();
  int64_t n = tree_size;

  // 2. Best-first selection.
  for (int64_t round = 1; round < n; ++round) {
    uint64_t best = 0;
    for (int64_t i = 1 + tid; i < num_pool; i += kThreads) {
      const int64_t p = par[i];
      if (p >= 0 && is_taken(taken, p) && !is_taken(taken, i)) {
        const uint64_t key = core::rank_key(scores[i], i);
        best = key > best ? key : best;
      }
    }
    best = warp_max(best);
    if (lane == 0) warp_partial[warp] = best;
    __syncthreads();
    if (warp == 0) {
      uint64_t v = lane < kWarps ? warp_partial[lane] : 0;
      v = warp_max(v);
      if (lane == 0) {
        if (v == 0) {  // no selectable node: impossible for a validated row, but never spin
          tree_size = static_cast<int32_t>(round);
        } else {
          const int64_t node = core::rank_key_index(v);
          taken[node >> 5] |= 1u << (node & 31);
          pick_order[round] = static_cast<int32_t>(node);
        }
      }
    }
    __syncthreads();
    if (tree_size != n) {
      n = tree_size;
      break;
    }
  }

  // 3a. Ascending order by rank counting (pool indices are distinct).
  for (int64_t j = tid; j < n; j += kThreads) {
    const int32_t v = pick_order[j];
    int64_t rank = 0;
    for (int64_t k = 0; k < n; ++k) rank += pick_order[k] < v ? 1 : 0;
    sorted[rank] = v;
  }
  __syncthreads();
  // 3b. Parent's position: a binary search among the lower positions.
  for (int64_t j = tid; j < n; j += kThreads) {
    int32_t position = -1;
    if (j > 0) {
      const int64_t target = par[sorted[j]];
      int64_t lo = 0, hi = j;
      while (lo < hi) {
        const int64_t mid = (lo + hi) >> 1;
        if (sorted[mid] < target) lo = mid + 1; else hi = mid;
      }
      position = static_cast<int32_t>(lo);
    }
    sel_parent[j] = position;
  }
  __syncthreads();
  // 3c. Per-node outputs. Depth walks are bounded by j (parents precede).
  const int64_t node_row = b * n_max;
  for (int64_t j = tid; j < n_max; j += kThreads) {
    int64_t selected = -1, token = -1, parent = -1, depth = 0, first_child = -1, next_sib = -1;
    if (j < n) {
      selected = sorted[j];
      token = args.pool_tokens[b * num_pool + selected];
      parent = sel_parent[j];
      for (int64_t v = j; v > 0 && depth < j; v = sel_parent[v]) ++depth;
      for (int64_t k = j + 1; k < n && (first_child < 0 || (next_sib < 0 && j > 0)); ++k) {
        if (first_child < 0 && sel_parent[k] == j) first_child = k;
        if (next_sib < 0 && j > 0 && sel_parent[k] == parent) next_sib = k;
      }
      sel_depth[j] = static_cast<int32_t>(depth);
      sel_first_child[j] = static_cast<int32_t>(first_child);
    }
    args.selected[node_row + j] = selected;
    args.tokens[node_row + j] = token;
    args.parents[node_row + j] = parent;
    args.depth[node_row + j] = depth;
    args.first_child[node_row + j] = first_child;
    args.next_sibling[node_row + j] = next_sib;
  }
  // 3d. Packed mask rows, one thread per row.
  int32_t* packed = args.packed_mask + b * n_max * words;
  for (int64_t row = tid; row < n_max; row += kThreads) {
    core::write_packed_mask_row(row, n, sel_parent, packed + row * words, words);
  }
  int64_t* retrieve = args.retrieve + b * n_max * n_max;
  for (int64_t e = tid; e < n_max * n_max; e += kThreads) retrieve[e] = -1;
  if (tid == 0) args.num_nodes[b] = n;
  // Makes this block's packed words, retrieve fill and sel_* arrays visible.
  __syncthreads();
  // 3e. Bool mask from the packed words (coalesced writes).
  bool* mask = args.mask + b * n_max * n_max;
  for (int64_t e = tid; e < n_max * n_max; e += kThreads) {
    const int64_t i = e / n_max;
    const int64_t j = e - i * n_max;
    mask[e] = (static_cast<uint32_t>(packed[i * words + (j >> 5)]) >> (j & 31)) & 1u;
  }
  // 3f. Retrieve rows: the r-th leaf (increasing index) writes row r.
  for (int64_t j = tid; j < n; j += kThreads) {
    if (sel_first_child[j] != -1) continue;
    int64_t rank = 0;
    for (int64_t k = 0; k < j; ++k) rank += sel_first_child[k] == -1 ? 1 : 0;
    core::write_root_path(j, sel_depth[j], sel_parent, retrieve + rank * n_max);
  }
}

}  // namespace

cudaError_t launch_build_tree(const BuildTreeArgs& args, cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  if (args.batch > 0x7FFFFFFF || args.n_max < 1) return cudaErrorInvalidValue;
  const int64_t shared_bytes = build_tree_shared_bytes(args.num_pool, args.n_max);
  if (shared_bytes > kDefaultSharedLimit) {
    int device = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    // The kernel also uses a little static shared memory.
    if (shared_bytes + 1024 > optin) return cudaErrorInvalidValue;
    err = cudaFuncSetAttribute(build_tree_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return err;
  }
  build_tree_kernel<<<static_cast<unsigned>(args.batch), kThreads,
                      static_cast<size_t>(shared_bytes), stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace heterospec

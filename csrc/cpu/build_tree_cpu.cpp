// CPU kernels of build_tree / build_tree_out: one request per at::parallel_for
// item. Best-first selection with a binary heap keyed by core::rank_key, then
// the tree description with the helpers of core/build_tree.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "build_tree_checks.h"
#include "core/build_tree.h"
#include "core/tree.h"
#include "cpu/common.h"

namespace heterospec {
namespace {

struct TreeOutputs {
  int64_t* selected;
  int64_t* tokens;
  int64_t* parents;
  int64_t* depth;
  bool* mask;
  int32_t* packed_mask;
  int64_t* first_child;
  int64_t* next_sibling;
  int64_t* retrieve;
  int64_t* num_nodes;
};

// Scratch reused across the requests of one parallel_for chunk.
struct Scratch {
  std::vector<int64_t> child_head, child_next;  // pool children, increasing index
  std::vector<uint64_t> heap;                   // rank keys of selectable nodes
  std::vector<int64_t> taken;                   // selected pool indices
};

// Selects `n` pool nodes best-first into scratch.taken (ascending on return).
void select_best_first(const int64_t* par, const float* scores, int64_t num_pool, int64_t n,
                       Scratch& s) {
  s.child_head.assign(static_cast<size_t>(num_pool), -1);
  s.child_next.resize(static_cast<size_t>(num_pool));
  for (int64_t i = num_pool - 1; i >= 1; --i) {
    const int64_t p = par[i];
    if (p < 0) continue;
    s.child_next[i] = s.child_head[p];
    s.child_head[p] = i;
  }
  s.heap.clear();
  s.taken.clear();
  s.taken.push_back(0);
  int64_t node = 0;
  while (static_cast<int64_t>(s.taken.size()) < n) {
    for (int64_t c = s.child_head[node]; c >= 0; c = s.child_next[c]) {
      s.heap.push_back(core::rank_key(scores[c], c));
      std::push_heap(s.heap.begin(), s.heap.end());
    }
    if (s.heap.empty()) break;  // unreachable for a validated pool with n <= valid nodes
    std::pop_heap(s.heap.begin(), s.heap.end());
    node = core::rank_key_index(s.heap.back());
    s.heap.pop_back();
    s.taken.push_back(node);
  }
  std::sort(s.taken.begin(), s.taken.end());
}

// Writes request b's outputs for the n selected pool nodes in `taken`
// (ascending); n == 0 emits the all-padding request.
void emit_tree(const int64_t* par, const int64_t* pool_tokens, const std::vector<int64_t>& taken,
               int64_t n, int64_t n_max, const TreeOutputs& out, int64_t b) {
  const int64_t words = core::packed_mask_words(n_max);
  int64_t* selected = out.selected + b * n_max;
  int64_t* tokens = out.tokens + b * n_max;
  int64_t* parents = out.parents + b * n_max;
  int64_t* depth = out.depth + b * n_max;
  int64_t* first_child = out.first_child + b * n_max;
  int64_t* next_sibling = out.next_sibling + b * n_max;
  bool* mask = out.mask + b * n_max * n_max;
  int32_t* packed = out.packed_mask + b * n_max * words;
  int64_t* retrieve = out.retrieve + b * n_max * n_max;

  for (int64_t j = 0; j < n_max; ++j) {
    selected[j] = tokens[j] = parents[j] = first_child[j] = next_sibling[j] = -1;
    depth[j] = 0;
  }
  for (int64_t j = 0; j < n; ++j) {
    const int64_t node = taken[j];
    selected[j] = node;
    tokens[j] = pool_tokens[node];
    if (j > 0) {
      // The parent was taken before its child and has a lower pool index.
      const auto it = std::lower_bound(taken.begin(), taken.begin() + j, par[node]);
      parents[j] = it - taken.begin();
      depth[j] = depth[parents[j]] + 1;
    }
  }
  for (int64_t j = n - 1; j >= 1; --j) {  // descending, so child lists come out ascending
    const int64_t p = parents[j];
    next_sibling[j] = first_child[p];
    first_child[p] = j;
  }
  for (int64_t row = 0; row < n_max; ++row) {
    int32_t* row_words = packed + row * words;
    core::write_packed_mask_row(row, n, parents, row_words, words);
    bool* mask_row = mask + row * n_max;
    for (int64_t j = 0; j < n_max; ++j) {
      mask_row[j] = (static_cast<uint32_t>(row_words[j >> 5]) >> (j & 31)) & 1u;
    }
  }
  std::fill(retrieve, retrieve + n_max * n_max, int64_t{-1});
  int64_t leaf_rank = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (first_child[j] != -1) continue;
    core::write_root_path(j, depth[j], parents, retrieve + leaf_rank * n_max);
    ++leaf_rank;
  }
  out.num_nodes[b] = n;
}

void build_tree_out_cpu(const at::Tensor& pool_parents_in, const at::Tensor& pool_scores_in,
                        const at::Tensor& pool_tokens_in, const at::Tensor& top_n_in,
                        at::Tensor& selected, at::Tensor& tokens, at::Tensor& parents,
                        at::Tensor& depth, at::Tensor& mask, at::Tensor& packed_mask,
                        at::Tensor& first_child, at::Tensor& next_sibling, at::Tensor& retrieve,
                        at::Tensor& num_nodes) {
  const int64_t n_max = check_build_tree_out_args(
      pool_parents_in, pool_scores_in, pool_tokens_in, top_n_in, selected, tokens, parents, depth,
      mask, packed_mask, first_child, next_sibling, retrieve, num_nodes);
  const at::Tensor pool_parents = pool_parents_in.contiguous();
  const at::Tensor pool_scores = pool_scores_in.contiguous();
  const at::Tensor pool_tokens = pool_tokens_in.contiguous();
  const at::Tensor top_n = top_n_in.contiguous();
  const int64_t batch = pool_parents.size(0);
  const int64_t num_pool = pool_parents.size(1);

  const int64_t* par_ptr = pool_parents.data_ptr<int64_t>();
  const float* score_ptr = pool_scores.data_ptr<float>();
  const int64_t* token_ptr = pool_tokens.data_ptr<int64_t>();
  const int64_t* top_n_ptr = top_n.data_ptr<int64_t>();
  const TreeOutputs out{selected.data_ptr<int64_t>(),    tokens.data_ptr<int64_t>(),
                        parents.data_ptr<int64_t>(),     depth.data_ptr<int64_t>(),
                        mask.data_ptr<bool>(),           packed_mask.data_ptr<int32_t>(),
                        first_child.data_ptr<int64_t>(), next_sibling.data_ptr<int64_t>(),
                        retrieve.data_ptr<int64_t>(),    num_nodes.data_ptr<int64_t>()};
  std::vector<int64_t> bad_node(static_cast<size_t>(batch), -1);

  at::parallel_for(0, batch, cpu::request_grain(num_pool), [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* par = par_ptr + b * num_pool;
      const int64_t bad = core::first_malformed_node(par, num_pool);
      if (bad >= 0) {
        bad_node[b] = bad;
        scratch.taken.clear();
        emit_tree(par, token_ptr + b * num_pool, scratch.taken, 0, n_max, out, b);
        continue;
      }
      int64_t valid = 0;
      for (int64_t i = 0; i < num_pool; ++i) valid += core::is_real_node(par, i) ? 1 : 0;
      const int64_t n = core::clamp_tree_size(top_n_ptr[b], n_max, valid);
      select_best_first(par, score_ptr + b * num_pool, num_pool, n, scratch);
      emit_tree(par, token_ptr + b * num_pool, scratch.taken,
                static_cast<int64_t>(scratch.taken.size()), n_max, out, b);
    }
  });

  cpu::raise_lowest_malformed_tree("build_tree", "pool_parents", bad_node, par_ptr, num_pool);
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CPU, m) {
  m.impl("build_tree", &heterospec::build_tree_functional<heterospec::build_tree_out_cpu>);
  m.impl("build_tree_out", &heterospec::build_tree_out_cpu);
}

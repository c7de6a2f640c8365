// CPU kernels of stratify / stratify_out: one request per at::parallel_for
// item; per-request semantics come from core/stratify.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "core/stratify.h"
#include "core/tree.h"
#include "cpu/common.h"
#include "stratify_checks.h"

namespace heterospec {
namespace {

void stratify_out_cpu(const at::Tensor& step_entropy_in, const at::Tensor& confidence_in,
                      const at::Tensor& parents_in, const at::Tensor& thresholds_in,
                      const at::Tensor& policy_in, at::Tensor& path_entropy, at::Tensor& pstar,
                      at::Tensor& stratum, at::Tensor& extra_depth, at::Tensor& top_n) {
  check_stratify_out_args(step_entropy_in, confidence_in, parents_in, thresholds_in, policy_in,
                          path_entropy, pstar, stratum, extra_depth, top_n);
  const at::Tensor step_entropy = step_entropy_in.contiguous();
  const at::Tensor confidence = confidence_in.contiguous();
  const at::Tensor parents = parents_in.contiguous();
  const at::Tensor thresholds = thresholds_in.contiguous();
  const at::Tensor policy = policy_in.contiguous();

  const int64_t batch = parents.size(0);
  const int64_t num_nodes = parents.size(1);
  const int64_t num_thresholds = thresholds.size(0);
  const float* thr = thresholds.data_ptr<float>();
  for (int64_t j = 0; j + 1 < num_thresholds; ++j) {
    // `<=` also rejects NaN thresholds.
    HX_CHECK_VALUE(thr[j] <= thr[j + 1], "stratify: thresholds must be sorted ascending, but "
                   "thresholds[", j, "] = ", hx_value(thr[j]), " and thresholds[", j + 1,
                   "] = ", hx_value(thr[j + 1]));
  }

  const float* entropy_ptr = step_entropy.data_ptr<float>();
  const float* confidence_ptr = confidence.data_ptr<float>();
  const int64_t* parents_ptr = parents.data_ptr<int64_t>();
  const int64_t* policy_ptr = policy.data_ptr<int64_t>();
  float* h_out = path_entropy.data_ptr<float>();
  int64_t* pstar_out = pstar.data_ptr<int64_t>();
  int64_t* stratum_out = stratum.data_ptr<int64_t>();
  int64_t* extra_out = extra_depth.data_ptr<int64_t>();
  int64_t* top_n_out = top_n.data_ptr<int64_t>();
  // First malformed node per request (-1: valid); checked after the loop so
  // the error always names the lowest bad request.
  std::vector<int64_t> bad_node(static_cast<size_t>(batch), -1);

  at::parallel_for(0, batch, cpu::request_grain(num_nodes), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> path_buffer(static_cast<size_t>(num_nodes));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* par = parents_ptr + b * num_nodes;
      const float* conf = confidence_ptr + b * num_nodes;
      const int64_t bad = core::first_malformed_node(par, num_nodes);
      if (bad >= 0) {
        bad_node[b] = bad;
        h_out[b] = __builtin_nanf("");
        pstar_out[b] = stratum_out[b] = core::kStratifyInvalidIndex;
        extra_out[b] = top_n_out[b] = 0;
        continue;
      }
      uint64_t best = 0;
      for (int64_t i = 1; i < num_nodes; ++i) {
        if (par[i] < 0) continue;
        const uint64_t key = core::rank_key(conf[i], i);
        if (key > best) best = key;
      }
      const int64_t node = best == 0 ? 0 : core::rank_key_index(best);
      const float h = core::path_entropy(par, entropy_ptr + b * num_nodes, node,
                                         path_buffer.data(), num_nodes);
      const int64_t s = core::stratum_of(h, thr, num_thresholds);
      h_out[b] = h;
      pstar_out[b] = node;
      stratum_out[b] = s;
      extra_out[b] = policy_ptr[2 * s];
      top_n_out[b] = policy_ptr[2 * s + 1];
    }
  });

  cpu::raise_lowest_malformed_tree("stratify", "parents", bad_node, parents_ptr, num_nodes);
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CPU, m) {
  m.impl("stratify", &heterospec::stratify_functional<heterospec::stratify_out_cpu>);
  m.impl("stratify_out", &heterospec::stratify_out_cpu);
}

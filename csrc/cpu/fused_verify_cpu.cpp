// CPU kernel of fused_verify: per request, walk the draft tree from the root,
// reading only the target rows of visited nodes (root + accepted nodes), each
// once. Scalar accept / draw / tie rules come from core/fused_verify.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "check.h"
#include "core/fused_verify.h"
#include "core/tree.h"
#include "cpu/common.h"
#include "fused_verify_checks.h"

namespace heterospec {
namespace {

namespace fv = core::verify;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Logits are scanned in blocks: a vectorisable max over the block, and a
// second look at the block only when its max beats the best so far.
constexpr int64_t kBlock = 256;

// Pointers to one request's inputs (rows of the small [B, N] / [B] tensors are
// contiguous; logits / draft_probs rows are addressed through their strides).
struct RequestView {
  const int64_t* candidates;
  const int64_t* parents;
  const float* uniforms;
  float temperature;
  int64_t top_k;
  float top_p;
};

// Per-thread scratch, allocated on first use and reused across requests.
struct Scratch {
  std::vector<double> weights;    // [V] processed (residual) distribution
  std::vector<float> selection;   // [V] copy for the top-k nth_element
  std::vector<double> ranked;     // kept weights for the top-p threshold
};

// Scan of one row: the max logit (first occurrence = lowest id) and whether
// the row is invalid data (NaN / +inf, or every logit -inf).
struct RowMax {
  float value;
  int64_t id;
  bool invalid;
};

template <typename scalar_t>
RowMax scan_row_max(const scalar_t* row, int64_t vocab) {
  RowMax best{kNegInf, -1, false};
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t end = std::min(vocab, start + kBlock);
    float block_max = kNegInf;
    bool bad = false;
    for (int64_t i = start; i < end; ++i) {
      const float x = static_cast<float>(row[i]);
      block_max = x > block_max ? x : block_max;
      bad |= fv::invalid_logit(x);
    }
    if (bad) return RowMax{0.0f, -1, true};
    if (block_max > best.value) {
      for (int64_t i = start; i < end; ++i) {
        if (static_cast<float>(row[i]) == block_max) {
          best.value = block_max;
          best.id = i;
          break;
        }
      }
    }
  }
  best.invalid = best.id < 0;  // every logit -inf
  return best;
}

// The k-th largest logit of a row (ties counted separately).
template <typename scalar_t>
float kth_largest_logit(const scalar_t* row, int64_t vocab, int64_t k,
                        std::vector<float>& selection) {
  selection.resize(vocab);
  for (int64_t i = 0; i < vocab; ++i) selection[i] = static_cast<float>(row[i]);
  std::nth_element(selection.begin(), selection.begin() + (k - 1), selection.end(),
                   std::greater<float>());
  return selection[k - 1];
}

// Top-p threshold tau over the kept weights: partially sort the largest m
// weights, widening m until the running sum reaches top_p * total (the usual
// peaked distribution needs one small round). 0 keeps everything.
double top_p_threshold(const std::vector<double>& weights, int64_t vocab, double total,
                       float top_p, std::vector<double>& ranked) {
  ranked.clear();
  for (int64_t i = 0; i < vocab; ++i) {
    if (weights[i] > 0.0) ranked.push_back(weights[i]);
  }
  const int64_t count = static_cast<int64_t>(ranked.size());
  for (int64_t m = std::min<int64_t>(count, 128);; m = std::min<int64_t>(count, m * 4)) {
    std::partial_sort(ranked.begin(), ranked.begin() + m, ranked.end(), std::greater<double>());
    const double target = static_cast<double>(top_p) * total;
    double running = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      running += ranked[i];
      if (fv::top_p_reached(running, target)) return ranked[i];
    }
    if (m == count) return 0.0;
  }
}

// fv::softmax_weight<float>, except where logit - max overflows float: a logit
// more than FLT_MAX below the row max (only with logits near +-3.4e38) would
// get weight 0 instead of exp((logit - max) / T), which a huge temperature
// makes large. Two floats subtract without overflow in double.
float softmax_weight(float logit, float max_logit, float temperature) {
  if (logit - max_logit == kNegInf && logit != kNegInf) {
    const double scaled = (static_cast<double>(logit) - max_logit) / temperature;
    return std::exp(static_cast<float>(scaled));
  }
  return fv::softmax_weight<float>(logit, max_logit, temperature);
}

// Fills scratch.weights with the processed target distribution of one row
// (unnormalised; temperature, top-k, softmax weights, top-p) and returns its
// total mass. `max_logit` comes from scan_row_max.
template <typename scalar_t>
double process_row(const scalar_t* row, int64_t vocab, float max_logit, const RequestView& req,
                   Scratch& scratch) {
  std::vector<double>& w = scratch.weights;
  w.resize(vocab);
  const bool use_top_k = fv::top_k_active(req.top_k, vocab);
  const float kth =
      use_top_k ? kth_largest_logit(row, vocab, req.top_k, scratch.selection) : kNegInf;
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    const float x = static_cast<float>(row[i]);
    const bool kept = !use_top_k || fv::top_k_keeps(x, kth);
    const double wi =
        kept ? static_cast<double>(softmax_weight(x, max_logit, req.temperature))
             : 0.0;
    w[i] = wi;
    total += wi;
  }
  if (fv::top_p_active(req.top_p)) {
    const double tau = top_p_threshold(w, vocab, total, req.top_p, scratch.ranked);
    total = 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
      if (!fv::top_p_keeps(w[i], tau)) w[i] = 0.0;
      total += w[i];
    }
  }
  return total;
}

double sum_weights(const std::vector<double>& w, int64_t vocab) {
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) total += w[i];
  return total;
}

int64_t draw_from(const std::vector<double>& w, int64_t vocab, double total, float u) {
  return fv::inverse_cdf_pick<double>(vocab, [&](int64_t i) { return w[i]; }, total, u);
}

// Raises ValueError for data that does not depend on the walk: the tree, the
// candidates, the sampling parameters and (sampling requests) the uniforms.
void validate_request(const RequestView& req, int64_t b, int64_t nodes, int64_t vocab) {
  const int64_t bad_node = core::first_malformed_node(req.parents, nodes);
  if (bad_node >= 0) cpu::raise_malformed_tree("fused_verify", "parents", b, req.parents, bad_node);
  const int64_t bad_token = fv::first_bad_candidate(req.parents, req.candidates, nodes, vocab);
  HX_CHECK_VALUE(bad_token < 0, "candidates: request ", b, ": node ", bad_token, " has token ",
                 req.candidates[bad_token < 0 ? 0 : bad_token], "; expected a token in [0, ",
                 vocab, ")");
  HX_CHECK_VALUE(fv::valid_temperature(req.temperature), "temperature: request ", b,
                 " must be finite and >= 0, got ", hx_value(req.temperature));
  HX_CHECK_VALUE(fv::valid_top_p(req.top_p), "top_p: request ", b, " must lie in (0, 1], got ",
                 hx_value(req.top_p));
  if (!fv::is_greedy(req.temperature)) {
    for (int64_t i = 0; i < nodes; ++i) {
      HX_CHECK_VALUE(fv::valid_uniform(req.uniforms[i]), "uniforms: request ", b, " column ", i,
                     " must lie in [0, 1), got ", hx_value(req.uniforms[i]));
    }
  }
}

struct Walk {
  std::vector<int64_t> path;  // root, then accepted nodes
  int64_t emitted;
};

template <typename scalar_t>
const scalar_t* checked_row(const scalar_t* logits_b, int64_t stride_n, int64_t v, int64_t vocab,
                            int64_t b, RowMax& max_out) {
  const scalar_t* row = logits_b + v * stride_n;
  max_out = scan_row_max(row, vocab);
  HX_CHECK_VALUE(!max_out.invalid, "target_logits: request ", b, " node ", v,
                 ": the row holds NaN or +inf, or every logit is -inf");
  return row;
}

template <typename scalar_t>
void walk_greedy(const scalar_t* logits_b, int64_t stride_n, const RequestView& req, int64_t b,
                 int64_t nodes, int64_t vocab, Walk& walk) {
  int64_t v = 0;
  while (true) {
    RowMax best;
    checked_row(logits_b, stride_n, v, vocab, b, best);
    int64_t accepted = fv::kNoNode;
    for (int64_t c = fv::next_child(req.parents, nodes, v, v); c != fv::kNoNode;
         c = fv::next_child(req.parents, nodes, v, c)) {
      if (req.candidates[c] == best.id) {
        accepted = c;
        break;
      }
    }
    if (accepted == fv::kNoNode) {
      walk.emitted = best.id;
      return;
    }
    walk.path.push_back(accepted);
    v = accepted;
  }
}

// Deterministic drafts: residual r starts as p; a child x is accepted iff
// u < r(x); a rejection zeroes r(x) (duplicates then have r = 0 and are
// skipped). The final draw is from r.
template <typename scalar_t>
void walk_sampling(const scalar_t* logits_b, int64_t stride_n, const RequestView& req, int64_t b,
                   int64_t nodes, int64_t vocab, Scratch& scratch, Walk& walk) {
  std::vector<double>& w = scratch.weights;
  std::vector<std::pair<int64_t, double>> rejected;
  int64_t v = 0;
  while (true) {
    RowMax best;
    const scalar_t* row = checked_row(logits_b, stride_n, v, vocab, b, best);
    double remaining = process_row(row, vocab, best.value, req, scratch);
    rejected.clear();
    int64_t accepted = fv::kNoNode;
    for (int64_t c = fv::next_child(req.parents, nodes, v, v); c != fv::kNoNode;
         c = fv::next_child(req.parents, nodes, v, c)) {
      if (fv::is_duplicate_sibling(req.parents, req.candidates, v, c)) continue;
      const int64_t token = req.candidates[c];
      if (fv::coin_accepts<double>(req.uniforms[c], w[token], remaining)) {
        accepted = c;
        break;
      }
      rejected.emplace_back(token, w[token]);
      remaining -= w[token];
      w[token] = 0.0;
    }
    if (accepted == fv::kNoNode) {
      double total = sum_weights(w, vocab);
      if (!(total > 0.0)) {  // rounding rejected every token with mass: draw from p
        for (const auto& [token, weight] : rejected) w[token] = weight;
        total = sum_weights(w, vocab);
      }
      walk.emitted = draw_from(w, vocab, total, req.uniforms[0]);
      return;
    }
    walk.path.push_back(accepted);
    v = accepted;
  }
}

// Real draft probabilities (children drawn i.i.d. from q = draft_probs row):
// accept x iff u < p'(x) / q(x); on rejection p' = norm(max(p' - q, 0)), kept
// when that is all zero. Duplicates are tested. The final draw is from p'.
template <typename scalar_t>
void walk_real_q(const scalar_t* logits_b, int64_t stride_n, const float* q_b, int64_t q_stride_n,
                 const RequestView& req, int64_t b, int64_t nodes, int64_t vocab,
                 Scratch& scratch, Walk& walk) {
  std::vector<double>& p = scratch.weights;
  int64_t v = 0;
  while (true) {
    RowMax best;
    const scalar_t* row = checked_row(logits_b, stride_n, v, vocab, b, best);
    const double total = process_row(row, vocab, best.value, req, scratch);
    const double inv_total = 1.0 / total;
    for (int64_t i = 0; i < vocab; ++i) p[i] *= inv_total;
    int64_t c = fv::next_child(req.parents, nodes, v, v);
    int64_t accepted = fv::kNoNode;
    if (c != fv::kNoNode) {
      const float* q = q_b + v * q_stride_n;
      bool q_ok = true;
      for (int64_t i = 0; i < vocab; ++i) q_ok &= fv::valid_draft_prob(q[i]);
      HX_CHECK_VALUE(q_ok, "draft_probs: request ", b, " node ", v,
                     ": values must be finite and >= 0");
      for (; c != fv::kNoNode; c = fv::next_child(req.parents, nodes, v, c)) {
        const int64_t token = req.candidates[c];
        if (fv::coin_accepts<double>(req.uniforms[c], p[token], static_cast<double>(q[token]))) {
          accepted = c;
          break;
        }
        double mass = 0.0;
        for (int64_t i = 0; i < vocab; ++i) mass += fv::residual_minus_draft(p[i], q[i]);
        if (mass > 0.0) {
          const double inv_mass = 1.0 / mass;
          for (int64_t i = 0; i < vocab; ++i) p[i] = fv::residual_minus_draft(p[i], q[i]) * inv_mass;
        }
      }
    }
    if (accepted == fv::kNoNode) {
      walk.emitted = draw_from(p, vocab, sum_weights(p, vocab), req.uniforms[0]);
      return;
    }
    walk.path.push_back(accepted);
    v = accepted;
  }
}

template <typename scalar_t>
void fused_verify_kernel(const at::Tensor& logits, const at::Tensor& candidates,
                         const at::Tensor& parents, const at::Tensor& temperature,
                         const at::Tensor& top_k, const at::Tensor& top_p,
                         const at::Tensor& uniforms, const std::optional<at::Tensor>& draft_probs,
                         at::Tensor& out_tokens, at::Tensor& accepted_nodes,
                         at::Tensor& num_accepted) {
  const int64_t batch = logits.size(0), nodes = logits.size(1), vocab = logits.size(2);
  const scalar_t* logits_ptr = logits.data_ptr<scalar_t>();
  const int64_t stride_b = logits.stride(0), stride_n = logits.stride(1);
  const float* q_ptr = draft_probs ? draft_probs->data_ptr<float>() : nullptr;
  const int64_t q_stride_b = draft_probs ? draft_probs->stride(0) : 0;
  const int64_t q_stride_n = draft_probs ? draft_probs->stride(1) : 0;
  const int64_t* cand_ptr = candidates.data_ptr<int64_t>();
  const int64_t* par_ptr = parents.data_ptr<int64_t>();
  const float* temp_ptr = temperature.data_ptr<float>();
  const int64_t* topk_ptr = top_k.data_ptr<int64_t>();
  const float* topp_ptr = top_p.data_ptr<float>();
  const float* u_ptr = uniforms.data_ptr<float>();
  int64_t* tok_out = out_tokens.data_ptr<int64_t>();
  int64_t* node_out = accepted_nodes.data_ptr<int64_t>();
  int64_t* num_out = num_accepted.data_ptr<int64_t>();

  auto view = [&](int64_t b) {
    return RequestView{cand_ptr + b * nodes, par_ptr + b * nodes, u_ptr + b * nodes,
                       temp_ptr[b], topk_ptr[b], topp_ptr[b]};
  };
  // Walk-independent checks first, in request order, so the reported error
  // does not depend on thread scheduling.
  for (int64_t b = 0; b < batch; ++b) validate_request(view(b), b, nodes, vocab);

  // Errors found during the walks (a NaN row, bad draft_probs) are kept per
  // request and the lowest one is raised after the loop: letting them escape
  // parallel_for would report whichever thread failed first, so the request
  // named would depend on the thread count and on timing.
  std::vector<std::exception_ptr> walk_error(static_cast<size_t>(batch));
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    Walk walk;
    walk.path.reserve(nodes);
    for (int64_t b = begin; b < end; ++b) {
      const RequestView req = view(b);
      const scalar_t* logits_b = logits_ptr + b * stride_b;
      walk.path.assign(1, 0);
      try {
        if (fv::is_greedy(req.temperature)) {
          walk_greedy(logits_b, stride_n, req, b, nodes, vocab, walk);
        } else if (q_ptr == nullptr) {
          walk_sampling(logits_b, stride_n, req, b, nodes, vocab, scratch, walk);
        } else {
          walk_real_q(logits_b, stride_n, q_ptr + b * q_stride_b, q_stride_n, req, b, nodes,
                      vocab, scratch, walk);
        }
      } catch (...) {
        // Later requests of this chunk cannot hold a lower failing index.
        walk_error[b] = std::current_exception();
        return;
      }
      fv::write_request_result(walk.path.data(), static_cast<int64_t>(walk.path.size()) - 1,
                               req.candidates, walk.emitted, nodes, tok_out + b * nodes,
                               node_out + b * nodes, num_out + b);
    }
  });
  for (const std::exception_ptr& error : walk_error) {
    if (error) std::rethrow_exception(error);
  }
}

void fused_verify_out_cpu(const at::Tensor& target_logits, const at::Tensor& candidates,
                          const at::Tensor& parents, const at::Tensor& temperature,
                          const at::Tensor& top_k, const at::Tensor& top_p,
                          const at::Tensor& uniforms, const std::optional<at::Tensor>& draft_probs,
                          at::Tensor& out_tokens, at::Tensor& accepted_nodes,
                          at::Tensor& num_accepted) {
  check_fused_verify_out_args(target_logits, candidates, parents, temperature, top_k, top_p,
                              uniforms, draft_probs, out_tokens, accepted_nodes, num_accepted);
  const at::Tensor logits = rows_contiguous(target_logits);
  std::optional<at::Tensor> q;
  if (draft_probs.has_value()) q = rows_contiguous(*draft_probs);
  FusedVerifyOutputs out(out_tokens, accepted_nodes, num_accepted);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    fused_verify_kernel<scalar_t>(logits, candidates.contiguous(), parents.contiguous(),
                                  temperature.contiguous(), top_k.contiguous(),
                                  top_p.contiguous(), uniforms.contiguous(), q, out.out_tokens,
                                  out.accepted_nodes, out.num_accepted);
  };
  switch (logits.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(c10::Half{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "target_logits: unsupported dtype ", logits.scalar_type());
  }
  out.copy_back(out_tokens, accepted_nodes, num_accepted);
}

}  // namespace
}  // namespace heterospec

TORCH_LIBRARY_IMPL(heterospec, CPU, m) {
  m.impl("fused_verify", &heterospec::fused_verify_functional<heterospec::fused_verify_out_cpu>);
  m.impl("fused_verify_out", &heterospec::fused_verify_out_cpu);
}

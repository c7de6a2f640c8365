// Torch-free semantics of fused_verify shared by the CPU and CUDA kernels.
//
// Every rule that decides WHICH token or node is emitted lives here, so the two
// backends can only differ in summation order (rounding), never in tie-breaking,
// padding, validation or the accept/draw comparisons. Rows are addressed with
// raw pointers; `parents` and `candidates` point at one request's [N] row.
//
// Trees follow the convention of core/tree.h (validated there with
// first_malformed_node / check_tree_node). The children of node v are the real
// nodes c > v with parents[c] == v, tried in increasing index order.
//
// Processing of a visited target row (identical for acceptance, residual and
// the final draw), with exact-arithmetic definitions:
//   z = logit / T;
//   top-k (active iff 0 < k < V): keep tokens with logit >= the k-th largest
//     logit (T > 0 is monotone, so this is the same set as on z; boundary ties
//     are all kept);
//   weights w(x) = exp((logit(x) - max_logit) / T) on kept tokens, 0 elsewhere
//     (and 0 for logit == -inf); p = w / sum(w);
//   top-p (active iff top_p < 1): with the kept weights sorted descending,
//     tau = the weight at which the running sum first reaches top_p * sum(w);
//     keep w >= tau (ties with tau kept); renormalise. If rounding keeps the
//     running sum below the target, every token is kept.
// Backends may accumulate in different orders; decisions may then differ only
// when a uniform lies within rounding distance of a threshold.
#pragma once

#include <cstdint>

#include "core/macros.h"
#include "core/tree.h"

namespace heterospec {
namespace core {
namespace verify {

// Value written to every unused slot of out_tokens / accepted_nodes, and to
// every slot of a request whose input is invalid (the CUDA sentinel).
constexpr int64_t kPad = -1;
constexpr int64_t kNoNode = -1;

// ---------------------------------------------------------------- tree helpers

// The first child of v with index > `after` (pass `after = v` for the first
// child), or kNoNode. Children are found by scanning parents, so a valid tree
// needs no sibling lists. O(N) per call.
HX_HD_INLINE int64_t next_child(const int64_t* parents, int64_t n, int64_t v,
                                int64_t after) {
  for (int64_t c = (after > v ? after : v) + 1; c < n; ++c) {
    if (parents[c] == v) return c;
  }
  return kNoNode;
}

// Index of the first real non-root node whose token lies outside [0, vocab),
// or -1. Padding slots and the root may hold anything (typically -1).
// Assumes first_malformed_node(parents, n) == -1.
HX_HD_INLINE int64_t first_bad_candidate(const int64_t* parents,
                                         const int64_t* candidates, int64_t n,
                                         int64_t vocab) {
  for (int64_t i = 1; i < n; ++i) {
    if (parents[i] < 0) continue;
    const int64_t t = candidates[i];
    if (t < 0 || t >= vocab) return i;
  }
  return -1;
}

// True iff child c of v repeats the token of an earlier sibling. In
// deterministic-draft sampling mode such a child is skipped: its token was
// already rejected (its residual is 0), so it can never be accepted and does
// not change the residual. In real-q mode duplicates are tested (i.i.d. draws).
HX_HD_INLINE bool is_duplicate_sibling(const int64_t* parents,
                                       const int64_t* candidates, int64_t v,
                                       int64_t c) {
  for (int64_t s = v + 1; s < c; ++s) {
    if (parents[s] == v && candidates[s] == candidates[c]) return true;
  }
  return false;
}

// ------------------------------------------------------ sampling parameters

// 0 selects greedy decoding for the request.
HX_HD_INLINE bool is_greedy(float temperature) { return temperature == 0.0f; }

// Finite and >= 0 (NaN and +inf are invalid).
HX_HD_INLINE bool valid_temperature(float temperature) {
  return temperature >= 0.0f && temperature <= kFloatMax;
}

// In (0, 1]; NaN is invalid. 1 disables top-p.
HX_HD_INLINE bool valid_top_p(float top_p) {
  return top_p > 0.0f && top_p <= 1.0f;
}

// In [0, 1); NaN is invalid. Validated for every column of a sampling request
// (greedy requests ignore their uniforms).
HX_HD_INLINE bool valid_uniform(float u) { return u >= 0.0f && u < 1.0f; }

HX_HD_INLINE bool top_k_active(int64_t top_k, int64_t vocab) {
  return top_k > 0 && top_k < vocab;
}

HX_HD_INLINE bool top_p_active(float top_p) { return top_p < 1.0f; }

// A logit that makes the row invalid data: NaN or +inf (an overflowed fp16
// logit has no meaningful probability). -inf is a valid masked token.
HX_HD_INLINE bool invalid_logit(float logit) {
  return logit != logit || logit > kFloatMax;
}

// Draft probabilities read in real-q mode must be finite and >= 0. Rows are
// used as given (not renormalised).
HX_HD_INLINE bool valid_draft_prob(float q) {
  return q >= 0.0f && q <= kFloatMax;
}

// ------------------------------------------------------------ row processing

// Greedy argmax order: a larger logit wins; equal logits go to the lowest id.
// Use while scanning ids in any order: replace (best, best_id) iff this holds.
HX_HD_INLINE bool argmax_better(float logit, int64_t id, float best,
                                int64_t best_id) {
  return logit > best || (logit == best && id < best_id);
}

// Top-k membership given the k-th largest logit of the row (counting ties as
// separate entries, i.e. element k-1 of the row sorted descending).
HX_HD_INLINE bool top_k_keeps(float logit, float kth_largest_logit) {
  return logit >= kth_largest_logit;
}

// Unnormalised softmax weight of a kept token, exp((logit - max) / T), in
// accumulator precision Acc (float or double). Subtracting in Acc before the
// division never overflows; -inf logits weigh exactly 0 (no -inf - -inf NaN).
// Requires T > 0 and a finite max_logit.
template <typename Acc>
HX_HD_INLINE Acc softmax_weight(float logit, float max_logit,
                                float temperature) {
  if (logit == -INFINITY) return Acc(0);
  return hx_exp((Acc(logit) - Acc(max_logit)) / Acc(temperature));
}

// Top-p: the running sum (kept weights, descending) has reached the target
// top_p * total once this holds; the weight just added is tau.
template <typename Acc>
HX_HD_INLINE bool top_p_reached(Acc running_sum, Acc target) {
  return running_sum >= target;
}

// Top-p membership given tau (ties with tau kept).
template <typename Acc>
HX_HD_INLINE bool top_p_keeps(Acc weight, Acc tau) {
  return weight >= tau;
}

// Top-p threshold over weights already sorted descending (length n, sum
// `total`): the weight at which the running sum first reaches top_p * total;
// 0 (keep everything) when rounding never reaches it. Sequential reference for
// CPU / tests; a GPU may find the same tau by a pivot search over values.
template <typename Acc>
HX_HD_INLINE Acc top_p_threshold_sorted(const Acc* desc, int64_t n, Acc total,
                                        float top_p) {
  const Acc target = Acc(top_p) * total;
  Acc running = Acc(0);
  for (int64_t i = 0; i < n; ++i) {
    running += desc[i];
    if (top_p_reached(running, target)) return desc[i];
  }
  return Acc(0);
}

// --------------------------------------------------------------- accept tests

// The one accept comparison of both sampling modes: accept iff
// u < numer / denom, written as u * denom < numer so that
//   * deterministic drafts: numer = w(x) (residual weight of the candidate),
//     denom = remaining residual mass (sum(w) minus the rejected weights),
//     i.e. u < r(x) with r renormalised;
//   * real q: numer = p'(x), denom = q(x); q(x) = 0 < p'(x) always accepts.
// A candidate with numer == 0 is never accepted (u >= 0, strict <).
template <typename Acc>
HX_HD_INLINE bool coin_accepts(float u, Acc numer, Acc denom) {
  return Acc(u) * denom < numer;
}

// Real-q residual update, pointwise: max(p'(x) - q(x), 0); divided by the sum
// of these over the row afterwards, unless that sum is 0 (then p' is kept).
template <typename Acc>
HX_HD_INLINE Acc residual_minus_draft(Acc p, float q) {
  const Acc d = p - Acc(q);
  return d > Acc(0) ? d : Acc(0);
}

// ------------------------------------------------------------- final draw

// Inverse CDF over token ids: the picked id is the smallest one whose
// cumulative mass exceeds u * total. Use while accumulating in id order:
// stop at the first id for which this holds.
template <typename Acc>
HX_HD_INLINE bool cdf_exceeds(Acc cumulative, Acc target) {
  return cumulative > target;
}

// Sequential inverse-CDF pick over `n` weights given by weight(i) (total
// precomputed, same order of summation assumed): the smallest id whose running
// sum exceeds u * total; if rounding runs past the end, the last id with
// weight > 0; kNoNode if every weight is 0. Never returns a zero-weight id.
template <typename Acc, typename WeightFn>
HX_HD_INLINE int64_t inverse_cdf_pick(int64_t n, WeightFn weight, Acc total,
                                      float u) {
  const Acc target = Acc(u) * total;
  Acc running = Acc(0);
  int64_t last_positive = kNoNode;
  for (int64_t i = 0; i < n; ++i) {
    const Acc w = weight(i);
    if (w > Acc(0)) {
      last_positive = i;
      running += w;
      if (cdf_exceeds(running, target)) return i;
    }
  }
  return last_positive;
}

// ------------------------------------------------------------------ outputs

// Writes the result of one request from its accepted path: path[0] == 0 (the
// root), path[1..A] the accepted nodes; out_tokens[:A] their tokens,
// out_tokens[A] = emitted (bonus / corrected token), every other slot kPad.
// Requires A + 1 <= n (always true: accepted node indices strictly increase).
HX_HD_INLINE void write_request_result(const int64_t* path, int64_t num_accepted,
                                       const int64_t* candidates,
                                       int64_t emitted, int64_t n,
                                       int64_t* out_tokens,
                                       int64_t* accepted_nodes,
                                       int64_t* num_accepted_out) {
  for (int64_t i = 0; i < n; ++i) {
    accepted_nodes[i] = i <= num_accepted ? path[i] : kPad;
    if (i < num_accepted) {
      out_tokens[i] = candidates[path[i + 1]];
    } else if (i == num_accepted) {
      out_tokens[i] = emitted;
    } else {
      out_tokens[i] = kPad;
    }
  }
  *num_accepted_out = num_accepted;
}

// The output of a request whose input is invalid (CUDA never raises): emits
// nothing, num_accepted = 0, every slot kPad.
HX_HD_INLINE void write_request_sentinel(int64_t n, int64_t* out_tokens,
                                         int64_t* accepted_nodes,
                                         int64_t* num_accepted_out) {
  for (int64_t i = 0; i < n; ++i) {
    out_tokens[i] = kPad;
    accepted_nodes[i] = kPad;
  }
  *num_accepted_out = 0;
}

}  // namespace verify
}  // namespace core
}  // namespace heterospec

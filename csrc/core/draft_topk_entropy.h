// Per-row semantics of draft_topk_entropy shared by the CPU loop and the CUDA
// threads / warps / blocks: the merge-able softmax-entropy state and the top-k
// ranking with its tie rule. Torch-free; compiles with plain g++ and nvcc.
//
// With z = logit / temperature, a row's state is
//   max     m = max_i z_i
//   sum     S = sum_i exp(z_i - m)
//   shifted T = sum_i exp(z_i - m) * (z_i - m)
// from which logsumexp = m + log S and entropy = log S - T / S (nats).
// States of disjoint parts of a row merge exactly (up to rounding), so a row
// can be split over threads, warps and CTAs in any order.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/macros.h"

namespace heterospec {
namespace core {

template <typename Acc>
HX_HD_INLINE Acc hx_neg_inf() {
  return -std::numeric_limits<Acc>::infinity();
}

// Online (max, sum, shifted) state of a set of scaled logits. Acc is float on
// CUDA and double on CPU. -inf values have probability 0 and are never added
// (0 * log 0 = 0); NaN / +inf values mark the state invalid.
template <typename Acc>
struct EntropyState {
  Acc max;
  Acc sum;
  Acc shifted;
  bool invalid;

  HX_HD_INLINE static EntropyState empty() {
    EntropyState s;
    s.max = hx_neg_inf<Acc>();
    s.sum = Acc(0);
    s.shifted = Acc(0);
    s.invalid = false;
    return s;
  }

  // Moves the reference point to new_max (>= max) keeping S and T exact:
  // exp(z - m') = a * exp(z - m) and z - m' = (z - m) + delta, a = exp(delta).
  HX_HD_INLINE void rescale_to(Acc new_max) {
    if (!(new_max > max)) return;
    if (sum > Acc(0)) {
      const Acc delta = max - new_max;
      const Acc a = hx_exp(delta);
      shifted = a * (shifted + delta * sum);
      sum *= a;
    }
    max = new_max;
  }

  // Adds one value already expressed relative to `max`: d = z - max <= 0 and
  // e = exp(d) (computed by the caller so hot loops may use a vector or fast
  // exp). d = -inf (a -inf logit) adds nothing, avoiding 0 * inf.
  HX_HD_INLINE void add_shifted(Acc d, Acc e) {
    if (d == hx_neg_inf<Acc>()) return;
    sum += e;
    shifted += e * d;
  }

  // Flags NaN and +inf (the only values for which !(z <= largest finite)).
  HX_HD_INLINE static bool is_bad(Acc z) {
    return !(z <= std::numeric_limits<Acc>::max());
  }

  HX_HD_INLINE void push(Acc z) {
    if (is_bad(z)) {
      invalid = true;
      return;
    }
    if (z == hx_neg_inf<Acc>()) return;
    rescale_to(z);
    const Acc d = z - max;
    add_shifted(d, hx_exp(d));
  }

  HX_HD_INLINE void merge(const EntropyState& other) {
    invalid = invalid || other.invalid;
    if (!(other.sum > Acc(0))) return;
    rescale_to(other.max);
    const Acc delta = other.max - max;  // <= 0
    const Acc a = hx_exp(delta);
    sum += a * other.sum;
    shifted += a * (other.shifted + delta * other.sum);
  }

  // A row is valid when it saw no NaN / +inf and at least one finite value.
  HX_HD_INLINE bool valid() const { return !invalid && sum > Acc(0); }
  HX_HD_INLINE Acc logsumexp() const { return max + hx_log(sum); }
  HX_HD_INLINE Acc entropy() const {
    const Acc h = hx_log(sum) - shifted / sum;
    return h < Acc(0) ? Acc(0) : h;  // rounding can leave -1 ulp on one-hot rows; NaN stays NaN
  }
};

// ---------------------------------------------------------------- top-k order

// One top-k candidate: a scaled logit and its token id. Ids fit in int32
// because the bindings require V < INT32_MAX.
struct TopKEntry {
  float value;
  int32_t id;
};

// Id of the padding entry that fills unused top-k slots; it ranks after every
// real entry, -inf ones included, because real ids are < INT32_MAX.
constexpr int32_t kTopKPadId = std::numeric_limits<int32_t>::max();

HX_HD_INLINE TopKEntry topk_pad() {
  TopKEntry e;
  e.value = hx_neg_inf<float>();
  e.id = kTopKPadId;
  return e;
}

// The one ranking rule of the op: higher value first, equal values by lower id.
// Strict, so no two real entries are equivalent. NaN never ranks before
// anything (its row is invalid anyway).
HX_HD_INLINE bool ranks_before(float value_a, int32_t id_a, float value_b, int32_t id_b) {
  return value_a > value_b || (value_a == value_b && id_a < id_b);
}
HX_HD_INLINE bool ranks_before(const TopKEntry& a, const TopKEntry& b) {
  return ranks_before(a.value, a.id, b.value, b.id);
}

// Inserts `entry` into `list[0, k)`, kept sorted by ranks_before and padded
// with topk_pad(); drops the entry that falls off the end. Returns whether the
// entry was kept. The caller may skip entries that do not rank before list[k-1].
HX_HD_INLINE bool topk_insert(TopKEntry* list, int k, TopKEntry entry) {
  if (!ranks_before(entry, list[k - 1])) return false;
  int pos = k - 1;
  while (pos > 0 && ranks_before(entry, list[pos - 1])) {
    list[pos] = list[pos - 1];
    --pos;
  }
  list[pos] = entry;
  return true;
}

// Entropy (nats) of the k values renormalised to a distribution: the same
// EntropyState over just the top-k values.
template <typename Acc>
HX_HD_INLINE Acc topk_renormalised_entropy(const TopKEntry* list, int k) {
  EntropyState<Acc> s = EntropyState<Acc>::empty();
  for (int i = 0; i < k; ++i) s.push(static_cast<Acc>(list[i].value));
  return s.entropy();
}

// Smallest power of two >= n (n >= 1), for padded bitonic merges.
HX_HD_INLINE int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace core
}  // namespace heterospec

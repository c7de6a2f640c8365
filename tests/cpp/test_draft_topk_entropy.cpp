#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "core/draft_topk_entropy.h"

namespace hc = heterospec::core;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Two-pass float64 softmax statistics, the definition the state must match.
void direct_stats(const std::vector<double>& z, double* lse, double* entropy) {
  double m = -kInf;
  for (double v : z) m = std::max(m, v);
  double s = 0.0;
  for (double v : z) s += std::exp(v - m);
  *lse = m + std::log(s);
  double h = 0.0;
  for (double v : z) {
    if (v == -kInf) continue;
    const double lp = v - *lse;
    h -= std::exp(lp) * lp;
  }
  *entropy = h;
}

std::vector<double> random_logits(int n, unsigned seed, double scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<double> z(n);
  for (auto& v : z) v = normal(gen);
  return z;
}

}  // namespace

TEST(DraftTopKEntropyState, PushMatchesTwoPassDefinition) {
  const std::vector<double> z = random_logits(5000, 1, 4.0);
  hc::EntropyState<double> s = hc::EntropyState<double>::empty();
  for (double v : z) s.push(v);
  double lse = 0, h = 0;
  direct_stats(z, &lse, &h);
  ASSERT_TRUE(s.valid());
  EXPECT_NEAR(s.logsumexp(), lse, 1e-12);
  EXPECT_NEAR(s.entropy(), h, 1e-11);
}

TEST(DraftTopKEntropyState, IncreasingInputsRescaleCorrectly) {
  // Every push is a new maximum: exercises rescale_to on each step.
  std::vector<double> z(200);
  std::iota(z.begin(), z.end(), -50.0);
  hc::EntropyState<double> s = hc::EntropyState<double>::empty();
  for (double v : z) s.push(v);
  double lse = 0, h = 0;
  direct_stats(z, &lse, &h);
  EXPECT_NEAR(s.logsumexp(), lse, 1e-12);
  EXPECT_NEAR(s.entropy(), h, 1e-12);
}

TEST(DraftTopKEntropyState, MergeOfSplitsEqualsWholeInAnyOrder) {
  const std::vector<double> z = random_logits(4096, 2, 3.0);
  hc::EntropyState<double> whole = hc::EntropyState<double>::empty();
  for (double v : z) whole.push(v);
  for (int parts : {2, 3, 7, 64}) {
    std::vector<hc::EntropyState<double>> partial(parts, hc::EntropyState<double>::empty());
    for (size_t i = 0; i < z.size(); ++i) partial[i % parts].push(z[i]);
    hc::EntropyState<double> forward = hc::EntropyState<double>::empty();
    for (const auto& p : partial) forward.merge(p);
    hc::EntropyState<double> backward = hc::EntropyState<double>::empty();
    for (int i = parts - 1; i >= 0; --i) backward.merge(partial[i]);
    EXPECT_NEAR(forward.logsumexp(), whole.logsumexp(), 1e-12) << parts;
    EXPECT_NEAR(forward.entropy(), whole.entropy(), 1e-11) << parts;
    EXPECT_NEAR(backward.logsumexp(), whole.logsumexp(), 1e-12) << parts;
    EXPECT_NEAR(backward.entropy(), whole.entropy(), 1e-11) << parts;
  }
}

TEST(DraftTopKEntropyState, NegInfHasZeroProbabilityAndNoNan) {
  hc::EntropyState<float> s = hc::EntropyState<float>::empty();
  s.push(-std::numeric_limits<float>::infinity());
  EXPECT_FALSE(s.valid());  // nothing finite yet
  s.push(2.0f);
  s.push(-std::numeric_limits<float>::infinity());
  ASSERT_TRUE(s.valid());
  EXPECT_FLOAT_EQ(s.logsumexp(), 2.0f);
  EXPECT_EQ(s.entropy(), 0.0f);
  // Merging an empty (all -inf) state changes nothing.
  hc::EntropyState<float> empty = hc::EntropyState<float>::empty();
  empty.push(-std::numeric_limits<float>::infinity());
  s.merge(empty);
  EXPECT_FLOAT_EQ(s.logsumexp(), 2.0f);
  // An empty state merged with a valid one becomes that state.
  hc::EntropyState<float> e2 = hc::EntropyState<float>::empty();
  e2.merge(s);
  EXPECT_FLOAT_EQ(e2.logsumexp(), 2.0f);
  EXPECT_EQ(e2.entropy(), 0.0f);
}

TEST(DraftTopKEntropyState, NanAndPosInfMakeTheStateInvalid) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(),
                    std::numeric_limits<float>::infinity()}) {
    hc::EntropyState<float> s = hc::EntropyState<float>::empty();
    s.push(1.0f);
    s.push(bad);
    s.push(3.0f);
    EXPECT_FALSE(s.valid());
    hc::EntropyState<float> other = hc::EntropyState<float>::empty();
    other.push(0.5f);
    other.merge(s);
    EXPECT_FALSE(other.valid()) << "invalid must survive a merge";
  }
  EXPECT_TRUE(hc::EntropyState<float>::is_bad(std::numeric_limits<float>::quiet_NaN()));
  EXPECT_TRUE(hc::EntropyState<float>::is_bad(std::numeric_limits<float>::infinity()));
  EXPECT_FALSE(hc::EntropyState<float>::is_bad(-std::numeric_limits<float>::infinity()));
  EXPECT_FALSE(hc::EntropyState<float>::is_bad(std::numeric_limits<float>::max()));
}

TEST(DraftTopKEntropyState, HugeLogitsDoNotOverflow) {
  hc::EntropyState<float> s = hc::EntropyState<float>::empty();
  s.push(3.0e38f);
  s.push(3.0e38f);
  s.push(-3.0e38f);
  ASSERT_TRUE(s.valid());
  EXPECT_FLOAT_EQ(s.sum, 2.0f);
  EXPECT_NEAR(s.entropy(), std::log(2.0f), 1e-6f);
}

TEST(DraftTopKEntropyState, UniformDistribution) {
  hc::EntropyState<double> s = hc::EntropyState<double>::empty();
  for (int i = 0; i < 1000; ++i) s.push(0.25);
  EXPECT_NEAR(s.entropy(), std::log(1000.0), 1e-12);
  EXPECT_NEAR(s.logsumexp(), 0.25 + std::log(1000.0), 1e-12);
}

TEST(DraftTopKRanking, HigherValueFirstThenLowerId) {
  EXPECT_TRUE(hc::ranks_before(2.0f, 9, 1.0f, 0));
  EXPECT_FALSE(hc::ranks_before(1.0f, 0, 2.0f, 9));
  EXPECT_TRUE(hc::ranks_before(1.0f, 3, 1.0f, 4));
  EXPECT_FALSE(hc::ranks_before(1.0f, 4, 1.0f, 3));
  EXPECT_FALSE(hc::ranks_before(1.0f, 4, 1.0f, 4));  // strict
  const float ninf = -std::numeric_limits<float>::infinity();
  // A real -inf entry beats padding; padding never beats anything real.
  EXPECT_TRUE(hc::ranks_before(hc::TopKEntry{ninf, 123}, hc::topk_pad()));
  EXPECT_FALSE(hc::ranks_before(hc::topk_pad(), hc::TopKEntry{ninf, 123}));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(hc::ranks_before(nan, 0, ninf, 5));
}

TEST(DraftTopKRanking, InsertKeepsTheBestKWithLowestIdTies) {
  std::mt19937 gen(7);
  std::uniform_int_distribution<int> small(-3, 3);  // many exact ties
  for (int k : {1, 2, 10, 64}) {
    std::vector<hc::TopKEntry> all;
    for (int i = 0; i < 1000; ++i) all.push_back({static_cast<float>(small(gen)), i});
    std::vector<hc::TopKEntry> list(k, hc::topk_pad());
    // Insert in a shuffled order: the result must not depend on the order.
    std::vector<hc::TopKEntry> shuffled = all;
    std::shuffle(shuffled.begin(), shuffled.end(), gen);
    for (const auto& e : shuffled) hc::topk_insert(list.data(), k, e);
    std::vector<hc::TopKEntry> expected = all;
    std::stable_sort(
        expected.begin(), expected.end(),
        [](const hc::TopKEntry& a, const hc::TopKEntry& b) { return a.value > b.value; });
    for (int i = 0; i < k; ++i) {
      EXPECT_EQ(list[i].id, expected[i].id) << "k=" << k << " i=" << i;
      EXPECT_EQ(list[i].value, expected[i].value);
    }
  }
}

TEST(DraftTopKRanking, FewerEntriesThanKLeavePadding) {
  std::vector<hc::TopKEntry> list(5, hc::topk_pad());
  const float ninf = -std::numeric_limits<float>::infinity();
  hc::topk_insert(list.data(), 5, {ninf, 4});
  hc::topk_insert(list.data(), 5, {1.0f, 9});
  hc::topk_insert(list.data(), 5, {ninf, 2});
  EXPECT_EQ(list[0].id, 9);
  EXPECT_EQ(list[1].id, 2);
  EXPECT_EQ(list[2].id, 4);
  EXPECT_EQ(list[3].id, hc::kTopKPadId);
  EXPECT_EQ(list[4].id, hc::kTopKPadId);
  EXPECT_FALSE(hc::topk_insert(list.data(), 5, hc::topk_pad()));
}

TEST(DraftTopKRanking, RenormalisedEntropy) {
  std::vector<hc::TopKEntry> list = {{3.0f, 0}, {3.0f, 1}, {3.0f, 2}, {3.0f, 3}};
  EXPECT_NEAR(hc::topk_renormalised_entropy<double>(list.data(), 4), std::log(4.0), 1e-12);
  const float ninf = -std::numeric_limits<float>::infinity();
  std::vector<hc::TopKEntry> one = {{1.0f, 5}, {ninf, 0}, {ninf, 1}};
  EXPECT_EQ(hc::topk_renormalised_entropy<double>(one.data(), 3), 0.0);
  // p = (e^1, e^0) / Z.
  std::vector<hc::TopKEntry> two = {{1.0f, 0}, {0.0f, 1}};
  const double p = std::exp(1.0) / (std::exp(1.0) + 1.0);
  EXPECT_NEAR(hc::topk_renormalised_entropy<double>(two.data(), 2),
              -(p * std::log(p) + (1 - p) * std::log(1 - p)), 1e-7);
}

TEST(DraftTopKRanking, NextPow2) {
  EXPECT_EQ(hc::next_pow2(1), 1);
  EXPECT_EQ(hc::next_pow2(2), 2);
  EXPECT_EQ(hc::next_pow2(10), 16);
  EXPECT_EQ(hc::next_pow2(64), 64);
  EXPECT_EQ(hc::next_pow2(33), 64);
}

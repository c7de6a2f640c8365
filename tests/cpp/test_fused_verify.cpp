#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/fused_verify.h"

namespace fv = heterospec::core::verify;

namespace {
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
}  // namespace

TEST(FusedVerifyTree, ChildrenInIndexOrderSkippingOtherParentsAndPadding) {
  //            0  1  2  3   4  5  6
  int64_t p[] = {-1, 0, 0, 1, -1, 0, 3};
  EXPECT_EQ(fv::next_child(p, 7, 0, 0), 1);
  EXPECT_EQ(fv::next_child(p, 7, 0, 1), 2);
  EXPECT_EQ(fv::next_child(p, 7, 0, 2), 5);
  EXPECT_EQ(fv::next_child(p, 7, 0, 5), fv::kNoNode);
  EXPECT_EQ(fv::next_child(p, 7, 3, 3), 6);
  EXPECT_EQ(fv::next_child(p, 7, 6, 6), fv::kNoNode);
}

TEST(FusedVerifyTree, ValidatesCandidatesOfRealNonRootNodesOnly) {
  int64_t p[] = {-1, 0, -1, 1};
  int64_t good[] = {-7, 4, -1, 0};  // root and padding may hold anything
  EXPECT_EQ(fv::first_bad_candidate(p, good, 4, 5), -1);
  int64_t too_big[] = {-1, 4, -1, 5};
  EXPECT_EQ(fv::first_bad_candidate(p, too_big, 4, 5), 3);
  int64_t negative[] = {-1, -1, 3, 0};
  EXPECT_EQ(fv::first_bad_candidate(p, negative, 4, 5), 1);
}

TEST(FusedVerifyTree, DuplicateSiblingsAreSameParentEarlierIndex) {
  int64_t p[] = {-1, 0, 1, 0, 0};
  int64_t c[] = {-1, 7, 7, 8, 7};
  EXPECT_FALSE(fv::is_duplicate_sibling(p, c, 0, 1));
  EXPECT_FALSE(fv::is_duplicate_sibling(p, c, 1, 2));  // same token, different parent
  EXPECT_FALSE(fv::is_duplicate_sibling(p, c, 0, 3));
  EXPECT_TRUE(fv::is_duplicate_sibling(p, c, 0, 4));
}

TEST(FusedVerifyParams, Validation) {
  EXPECT_TRUE(fv::valid_temperature(0.0f));
  EXPECT_TRUE(fv::valid_temperature(2.5f));
  EXPECT_FALSE(fv::valid_temperature(-1e-6f));
  EXPECT_FALSE(fv::valid_temperature(kNaN));
  EXPECT_FALSE(fv::valid_temperature(kInf));
  EXPECT_TRUE(fv::is_greedy(0.0f));
  EXPECT_TRUE(fv::is_greedy(-0.0f));
  EXPECT_FALSE(fv::is_greedy(1e-30f));

  EXPECT_TRUE(fv::valid_top_p(1.0f));
  EXPECT_TRUE(fv::valid_top_p(1e-6f));
  EXPECT_FALSE(fv::valid_top_p(0.0f));
  EXPECT_FALSE(fv::valid_top_p(1.0001f));
  EXPECT_FALSE(fv::valid_top_p(kNaN));
  EXPECT_TRUE(fv::top_p_active(0.999f));
  EXPECT_FALSE(fv::top_p_active(1.0f));

  EXPECT_TRUE(fv::valid_uniform(0.0f));
  EXPECT_TRUE(fv::valid_uniform(0.99999994f));
  EXPECT_FALSE(fv::valid_uniform(1.0f));
  EXPECT_FALSE(fv::valid_uniform(-0.1f));
  EXPECT_FALSE(fv::valid_uniform(kNaN));

  EXPECT_FALSE(fv::top_k_active(0, 10));
  EXPECT_FALSE(fv::top_k_active(-3, 10));
  EXPECT_FALSE(fv::top_k_active(10, 10));
  EXPECT_TRUE(fv::top_k_active(9, 10));

  EXPECT_TRUE(fv::invalid_logit(kNaN));
  EXPECT_TRUE(fv::invalid_logit(kInf));
  EXPECT_FALSE(fv::invalid_logit(-kInf));
  EXPECT_FALSE(fv::invalid_logit(3.0e38f));

  EXPECT_TRUE(fv::valid_draft_prob(0.0f));
  EXPECT_FALSE(fv::valid_draft_prob(-1e-9f));
  EXPECT_FALSE(fv::valid_draft_prob(kNaN));
  EXPECT_FALSE(fv::valid_draft_prob(kInf));
}

TEST(FusedVerifyRow, ArgmaxTiesGoToLowestIdInAnyScanOrder) {
  const float row[] = {1.0f, 3.0f, 2.0f, 3.0f, 3.0f};
  for (bool reverse : {false, true}) {
    float best = -kInf;
    int64_t best_id = -1;
    for (int i = 0; i < 5; ++i) {
      const int id = reverse ? 4 - i : i;
      if (best_id < 0 || fv::argmax_better(row[id], id, best, best_id)) {
        best = row[id];
        best_id = id;
      }
    }
    EXPECT_EQ(best_id, 1);
  }
}

TEST(FusedVerifyRow, TopKKeepsBoundaryTies) {
  EXPECT_TRUE(fv::top_k_keeps(2.0f, 2.0f));
  EXPECT_TRUE(fv::top_k_keeps(2.5f, 2.0f));
  EXPECT_FALSE(fv::top_k_keeps(1.999f, 2.0f));
}

TEST(FusedVerifyRow, SoftmaxWeightNeverNaNAndMasksNegInf) {
  EXPECT_EQ(fv::softmax_weight<double>(-kInf, 1.0f, 1.0f), 0.0);
  EXPECT_EQ(fv::softmax_weight<float>(-kInf, 1.0f, 0.5f), 0.0f);
  EXPECT_EQ(fv::softmax_weight<double>(4.0f, 4.0f, 0.7f), 1.0);
  EXPECT_NEAR(fv::softmax_weight<double>(1.0f, 2.0f, 0.5f), std::exp(-2.0), 1e-15);
  // (logit - max) overflows float: still exactly 0, not NaN
  EXPECT_EQ(fv::softmax_weight<float>(-3.0e38f, 3.0e38f, 0.01f), 0.0f);
  EXPECT_EQ(fv::softmax_weight<double>(-3.0e38f, 3.0e38f, 0.01f), 0.0);
}

TEST(FusedVerifyRow, TopPThresholdFirstReachKeepsTies) {
  // p = [.4, .2, .2, .2] (sorted): top_p .5 is reached inside the tie -> tau = .2
  const double desc[] = {0.4, 0.2, 0.2, 0.2};
  EXPECT_DOUBLE_EQ(fv::top_p_threshold_sorted(desc, 4, 1.0, 0.5f), 0.2);
  EXPECT_DOUBLE_EQ(fv::top_p_threshold_sorted(desc, 4, 1.0, 0.3f), 0.4);
  EXPECT_TRUE(fv::top_p_keeps(0.2, 0.2));
  EXPECT_FALSE(fv::top_p_keeps(0.1, 0.2));
  // unnormalised weights: the target scales with the total
  const double w[] = {4.0, 2.0, 2.0, 2.0};
  EXPECT_DOUBLE_EQ(fv::top_p_threshold_sorted(w, 4, 10.0, 0.3f), 4.0);
  // never reached (rounding): keep everything
  const double small[] = {0.25, 0.25};
  EXPECT_DOUBLE_EQ(fv::top_p_threshold_sorted(small, 2, 1.0, 0.9f), 0.0);
}

TEST(FusedVerifyAccept, ResidualTestNeverAcceptsZeroMass) {
  EXPECT_FALSE(fv::coin_accepts<double>(0.0f, 0.0, 1.0));
  EXPECT_FALSE(fv::coin_accepts<float>(0.0f, 0.0f, 0.5f));
  EXPECT_TRUE(fv::coin_accepts<double>(0.0f, 1e-300, 1.0));
  // u < w / remaining: w = .3, remaining .6 -> threshold .5, strict
  EXPECT_TRUE(fv::coin_accepts<double>(0.49f, 0.3, 0.6));
  EXPECT_FALSE(fv::coin_accepts<double>(0.5f, 0.3, 0.6));
  // p(x) = remaining (last token with mass) always accepts for u < 1
  EXPECT_TRUE(fv::coin_accepts<double>(0.99999994f, 0.25, 0.25));
}

TEST(FusedVerifyAccept, RealQRatioAndZeroQ) {
  // u < p'/q
  EXPECT_TRUE(fv::coin_accepts<double>(0.2f, 0.1, 0.4));
  EXPECT_FALSE(fv::coin_accepts<double>(0.25f, 0.1, 0.4));
  // q(x) = 0 < p'(x): always; both 0: never
  EXPECT_TRUE(fv::coin_accepts<double>(0.99999994f, 1e-12, 0.0));
  EXPECT_FALSE(fv::coin_accepts<double>(0.0f, 0.0, 0.0));
  // p' >= q: always
  EXPECT_TRUE(fv::coin_accepts<double>(0.99999994f, 0.5, 0.5));
  EXPECT_EQ(fv::residual_minus_draft(0.3, 0.5f), 0.0);
  EXPECT_NEAR(fv::residual_minus_draft(0.5, 0.25f), 0.25, 1e-15);
}

TEST(FusedVerifyDraw, InverseCdfSmallestIdExceedingAndFallback) {
  const std::vector<double> w = {0.0, 0.5, 0.0, 0.25, 0.25, 0.0};
  auto at = [&](int64_t i) { return w[i]; };
  EXPECT_EQ(fv::inverse_cdf_pick<double>(6, at, 1.0, 0.0f), 1);  // never the 0-mass id 0
  EXPECT_EQ(fv::inverse_cdf_pick<double>(6, at, 1.0, 0.4999f), 1);
  EXPECT_EQ(fv::inverse_cdf_pick<double>(6, at, 1.0, 0.5f), 3);  // strict: cum .5 !> .5
  EXPECT_EQ(fv::inverse_cdf_pick<double>(6, at, 1.0, 0.8f), 4);
  // a total larger than the row (rounding) runs past the end: last id with mass, not id 5
  EXPECT_EQ(fv::inverse_cdf_pick<double>(6, at, 2.0, 0.99f), 4);
  const std::vector<double> zero(4, 0.0);
  EXPECT_EQ(fv::inverse_cdf_pick<double>(4, [&](int64_t i) { return zero[i]; }, 0.0, 0.3f),
            fv::kNoNode);
}

TEST(FusedVerifyOutput, ResultAndSentinelWriteEverySlot) {
  const int64_t n = 5;
  const int64_t path[] = {0, 2, 4};
  const int64_t cands[] = {-1, 11, 12, 13, 14};
  std::vector<int64_t> tokens(n, 99), nodes(n, 99);
  int64_t num = 99;
  fv::write_request_result(path, 2, cands, 42, n, tokens.data(), nodes.data(), &num);
  EXPECT_EQ(num, 2);
  EXPECT_EQ(tokens, (std::vector<int64_t>{12, 14, 42, -1, -1}));
  EXPECT_EQ(nodes, (std::vector<int64_t>{0, 2, 4, -1, -1}));

  fv::write_request_result(path, 0, cands, 7, 1, tokens.data(), nodes.data(), &num);
  EXPECT_EQ(num, 0);
  EXPECT_EQ(tokens[0], 7);
  EXPECT_EQ(nodes[0], 0);

  fv::write_request_sentinel(n, tokens.data(), nodes.data(), &num);
  EXPECT_EQ(num, 0);
  EXPECT_EQ(tokens, std::vector<int64_t>(n, fv::kPad));
  EXPECT_EQ(nodes, std::vector<int64_t>(n, fv::kPad));
}

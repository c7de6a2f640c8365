#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/tree.h"

using heterospec::core::check_tree_node;
using heterospec::core::first_malformed_node;
using heterospec::core::float_order_key;
using heterospec::core::is_real_node;
using heterospec::core::rank_key;
using heterospec::core::rank_key_index;
using heterospec::core::TreeDefect;

TEST(Tree, AcceptsValidRowsWithPadding) {
  const std::vector<int64_t> parents = {-1, 0, 0, -1, 1, 2, -1};
  EXPECT_EQ(first_malformed_node(parents.data(), 7), -1);
  const std::vector<int64_t> root_only = {-1};
  EXPECT_EQ(first_malformed_node(root_only.data(), 1), -1);
}

TEST(Tree, FindsEachDefect) {
  const std::vector<int64_t> root = {0, 0};
  EXPECT_EQ(check_tree_node(root.data(), 0), TreeDefect::kRootHasParent);
  const std::vector<int64_t> self = {-1, 0, 2};
  EXPECT_EQ(first_malformed_node(self.data(), 3), 2);
  EXPECT_EQ(check_tree_node(self.data(), 2), TreeDefect::kParentOutOfRange);
  const std::vector<int64_t> below = {-1, -2};
  EXPECT_EQ(check_tree_node(below.data(), 1), TreeDefect::kParentOutOfRange);
  const std::vector<int64_t> under_padding = {-1, -1, 1};
  EXPECT_EQ(first_malformed_node(under_padding.data(), 3), 2);
  EXPECT_EQ(check_tree_node(under_padding.data(), 2), TreeDefect::kParentIsPadding);
}

// The cases fused_verify's own validator (now first_malformed_node) was tested with.
TEST(Tree, ReportsTheLowestMalformedNode) {
  const std::vector<int64_t> ok = {-1, 0, 0, 1, -1, 2};
  EXPECT_EQ(first_malformed_node(ok.data(), 6), -1);
  const std::vector<int64_t> root_parent = {0, 0};
  EXPECT_EQ(first_malformed_node(root_parent.data(), 2), 0);
  const std::vector<int64_t> forward = {-1, 2, 0};
  EXPECT_EQ(first_malformed_node(forward.data(), 3), 1);
  const std::vector<int64_t> below = {-1, 0, -3};
  EXPECT_EQ(first_malformed_node(below.data(), 3), 2);
  // A node under a parent whose own parent is below -1: the parent is the lowest bad node.
  const std::vector<int64_t> under_bad = {-1, -5, 1};
  EXPECT_EQ(first_malformed_node(under_bad.data(), 3), 1);
}

TEST(Tree, RealNodesAreTheRootAndNodesWithAParent) {
  //                                 0  1  2  3   4  5  6
  const std::vector<int64_t> p = {-1, 0, 0, 1, -1, 0, 3};
  EXPECT_TRUE(is_real_node(p.data(), 0));
  EXPECT_FALSE(is_real_node(p.data(), 4));
  EXPECT_TRUE(is_real_node(p.data(), 6));
}

TEST(Tree, FloatOrderKeyIsMonotone) {
  const float inf = std::numeric_limits<float>::infinity();
  const float values[] = {-inf, -3.4e38f, -1.0f, -1e-45f, -0.0f, 0.0f, 1e-45f, 1.0f, 3.4e38f, inf};
  for (size_t i = 0; i + 1 < sizeof(values) / sizeof(values[0]); ++i) {
    EXPECT_LT(float_order_key(heterospec::core::float_bits(values[i])),
              float_order_key(heterospec::core::float_bits(values[i + 1])))
        << values[i] << " vs " << values[i + 1];
  }
}

TEST(Tree, RankKeyOrdersByValueThenLowerIndex) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_GT(rank_key(1.0f, 5), rank_key(0.5f, 1));
  EXPECT_GT(rank_key(-1.0f, 5), rank_key(-2.0f, 1));
  EXPECT_GT(rank_key(0.5f, 1), rank_key(0.5f, 2));
  EXPECT_EQ(rank_key(nan, 3), rank_key(-inf, 3));  // NaN counts as -inf
  EXPECT_GT(rank_key(-inf, 2), rank_key(nan, 3));
  EXPECT_GT(rank_key(-0.0f, 1), rank_key(0.0f, 2));  // -0 == +0: lower index wins
  EXPECT_GT(rank_key(inf, 9), rank_key(3.4e38f, 0));
  EXPECT_GT(rank_key(-inf, 0x7FFFFFFF), uint64_t{0});  // 0 stays free for "none"
  for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{12345}, int64_t{0x7FFFFFFF}}) {
    EXPECT_EQ(rank_key_index(rank_key(1.5f, i)), i);
  }
}

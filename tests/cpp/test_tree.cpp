#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/tree.h"

using heterospec::core::check_tree_node;
using heterospec::core::first_malformed_node;
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

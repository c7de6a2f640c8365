#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/stratify.h"

using heterospec::core::node_depth;
using heterospec::core::path_entropy;
using heterospec::core::stratum_of;

TEST(Stratify, StratumCountsThresholdsAtOrBelow) {
  const std::vector<float> thr = {1.0f, 2.5f, 2.5f, 4.0f};
  EXPECT_EQ(stratum_of(0.5f, thr.data(), 4), 0);
  EXPECT_EQ(stratum_of(1.0f, thr.data(), 4), 1);
  EXPECT_EQ(stratum_of(2.5f, thr.data(), 4), 3);
  EXPECT_EQ(stratum_of(9.0f, thr.data(), 4), 4);
  EXPECT_EQ(stratum_of(std::nanf(""), thr.data(), 4), 4);
  EXPECT_EQ(stratum_of(3.0f, thr.data(), 0), 0);
}

TEST(Stratify, PathEntropySumsFromTheRootDown) {
  // Chain 0 -> 1 -> 2 -> 3. Root-down float32: (1 + 1e8) - 1e8 = 0; bottom-up would give 1.
  const std::vector<int64_t> parents = {-1, 0, 1, 2};
  const std::vector<float> e = {5.0f, 1.0f, 1e8f, -1e8f};
  EXPECT_EQ(node_depth(parents.data(), 3), 3);
  for (int64_t capacity : {1, 2, 3, 8}) {  // chunking must not change the summation order
    std::vector<int64_t> buffer(static_cast<size_t>(capacity));
    EXPECT_EQ(path_entropy(parents.data(), e.data(), 3, buffer.data(), capacity), 0.0f);
    EXPECT_EQ(path_entropy(parents.data(), e.data(), 0, buffer.data(), capacity), 0.0f);
    EXPECT_EQ(path_entropy(parents.data(), e.data(), 2, buffer.data(), capacity), 1e8f + 1.0f);
  }
}

TEST(Stratify, ChunkedPathMatchesIndexOrderRecurrence) {
  const int64_t n = 300;
  std::vector<int64_t> parents(n);
  std::vector<float> e(n), h(n, 0.0f);
  parents[0] = -1;
  for (int64_t i = 1; i < n; ++i) {
    parents[i] = (i * 7919) % 5 == 0 ? i / 2 : i - 1;
    e[i] = 1.0f / static_cast<float>(i) + static_cast<float>(i % 3) * 1e3f;
    h[i] = h[parents[i]] + e[i];
  }
  std::vector<int64_t> buffer(16);
  for (int64_t node : {int64_t{1}, int64_t{150}, int64_t{299}}) {
    EXPECT_EQ(path_entropy(parents.data(), e.data(), node, buffer.data(), 16), h[node]);
  }
}

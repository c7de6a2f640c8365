#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "core/build_tree.h"

using heterospec::core::clamp_tree_size;
using heterospec::core::packed_mask_words;
using heterospec::core::write_packed_mask_row;
using heterospec::core::write_root_path;

TEST(BuildTree, ClampsTreeSize) {
  EXPECT_EQ(clamp_tree_size(5, 64, 100), 5);
  EXPECT_EQ(clamp_tree_size(0, 64, 100), 1);
  EXPECT_EQ(clamp_tree_size(-7, 64, 100), 1);
  EXPECT_EQ(clamp_tree_size(100, 64, 100), 64);
  EXPECT_EQ(clamp_tree_size(100, 64, 10), 10);
  EXPECT_EQ(clamp_tree_size(5, 1, 10), 1);
}

TEST(BuildTree, PackedWords) {
  EXPECT_EQ(packed_mask_words(1), 1);
  EXPECT_EQ(packed_mask_words(32), 1);
  EXPECT_EQ(packed_mask_words(33), 2);
  EXPECT_EQ(packed_mask_words(64), 2);
  EXPECT_EQ(packed_mask_words(65), 3);
}

TEST(BuildTree, PackedRowIsAncestorClosureAcrossWords) {
  // Chain of 70 nodes in a 72-slot tree: row 69 has bits 0..69 set.
  const int64_t n_max = 72, n = 70, words = packed_mask_words(n_max);
  std::vector<int64_t> parents(n_max, -1);
  for (int64_t j = 1; j < n; ++j) parents[j] = j - 1;
  std::vector<int32_t> row(words, 12345);
  write_packed_mask_row(69, n, parents.data(), row.data(), words);
  EXPECT_EQ(row[0], -1);
  EXPECT_EQ(row[1], -1);
  EXPECT_EQ(row[2], 0x3F);
  // Padding row 71 attends to itself only.
  write_packed_mask_row(71, n, parents.data(), row.data(), words);
  EXPECT_EQ(row[0], 0);
  EXPECT_EQ(row[1], 0);
  EXPECT_EQ(row[2], 1 << 7);
}

TEST(BuildTree, PackedRowOfBranchingTree) {
  // 0 -> {1, 2}, 1 -> 3, 3 -> 4
  const std::vector<int32_t> parents = {-1, 0, 0, 1, 3};
  int32_t word = 0;
  write_packed_mask_row(4, 5, parents.data(), &word, 1);
  EXPECT_EQ(word, 0b11011);
  write_packed_mask_row(2, 5, parents.data(), &word, 1);
  EXPECT_EQ(word, 0b101);
  write_packed_mask_row(0, 5, parents.data(), &word, 1);
  EXPECT_EQ(word, 0b1);
}

TEST(BuildTree, GarbageParentsCannotLoop) {
  const std::vector<int64_t> cyclic = {-1, 2, 1};  // never produced, but must terminate
  int32_t word = 0;
  write_packed_mask_row(2, 3, cyclic.data(), &word, 1);
  EXPECT_EQ(word, 0b110);
}

TEST(BuildTree, RootPath) {
  const std::vector<int64_t> parents = {-1, 0, 0, 1, 3};
  std::vector<int64_t> path(5, -1);
  write_root_path(4, 3, parents.data(), path.data());
  EXPECT_EQ(path, (std::vector<int64_t>{0, 1, 3, 4, -1}));
}

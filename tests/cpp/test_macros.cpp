#include <gtest/gtest.h>

#include "core/macros.h"

TEST(CoreMacros, LogitDTypeValuesAreStableAcrossTheAbi) {
  // The .cpp bindings and the torch-free .cu launchers exchange this enum as int.
  EXPECT_EQ(static_cast<int>(heterospec::core::LogitDType::kFloat32), 0);
  EXPECT_EQ(static_cast<int>(heterospec::core::LogitDType::kFloat16), 1);
  EXPECT_EQ(static_cast<int>(heterospec::core::LogitDType::kBFloat16), 2);
  EXPECT_GE(heterospec::core::kMaxTopK, 10);
}

#include <gtest/gtest.h>

#include "core/runtime.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  amaq::configure_threads(0);
  return RUN_ALL_TESTS();
}

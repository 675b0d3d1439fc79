// Spawning a program with its output in a file, and its exit status.
#include "core/runtime.h"

#include <gtest/gtest.h>

#include "core/fs.h"
#include "testing.h"

namespace amaq {
namespace {

TEST(SpawnProcess, OutputGoesToTheFileAndTheExitCodeComesBack) {
  testing::TempDir tmp;
  const std::string out = tmp.file("out.txt");
  EXPECT_EQ(wait_process(spawn_process({"sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"}, out)), 3);
  EXPECT_EQ(read_file(out), "to-stdout\nto-stderr\n");
  EXPECT_EQ(wait_process(spawn_process({"sh", "-c", "kill -9 $$"}, out)), 128 + 9);
  EXPECT_AMAQ_ERROR(spawn_process({"amaq-no-such-program"}, out), "cannot start amaq-no-such-program");
}

}  // namespace
}  // namespace amaq

// The run's JSON-lines log: a line that cannot be written is an error naming the file, not a
// silently shorter log.
#include "train/metrics.h"

#include <gtest/gtest.h>

#include "core/fs.h"
#include "testing.h"

namespace amaq::train {
namespace {

TEST(JsonlLog, WritesOneFlushedLinePerCallAndNamesTheFileWhenTheDiskIsFull) {
  testing::TempDir tmp;
  {
    JsonlLog log(tmp.file("m.jsonl"));
    log.write({{"step", 0}});
    EXPECT_EQ(read_file(tmp.file("m.jsonl")), "{\"step\":0}\n");  // flushed before the log closes
    log.write({{"step", 1}});
  }
  EXPECT_EQ(read_file(tmp.file("m.jsonl")), "{\"step\":0}\n{\"step\":1}\n");
  JsonlLog full("/dev/full");  // every write fails with ENOSPC
  EXPECT_AMAQ_ERROR(full.write({{"step", 0}}), "/dev/full", "free disk space");
}

}  // namespace
}  // namespace amaq::train

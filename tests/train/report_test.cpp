// Bad input to `amaq report`: a directory that is not a run, a run with no step yet, and a metrics
// file cut off mid-line (a crash) get one clear error or a report of what is there.
#include "train/report.h"

#include <gtest/gtest.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/svg.h"
#include "testing.h"

namespace amaq::train {
namespace {

std::string error_of(const std::string& dir) {
  try {
    read_run(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(Report, NotARunAnEmptyLogAndACutLineAreHandled) {
  testing::TempDir tmp;
  make_dirs(tmp.file("nothing"));
  EXPECT_NE(error_of(tmp.file("nothing")).find("is not a run directory (it has no metrics.jsonl)"), std::string::npos);
  make_dirs(tmp.file("empty"));
  testing::write_bytes(tmp.file("empty/metrics.jsonl"), "");
  EXPECT_NE(error_of(tmp.file("empty")).find("holds no step yet"), std::string::npos);

  StepRecord r;
  r.task_loss = 2.5;
  r.fwd_bits = {4, 4, 4};
  r.step_seconds = 0.25;
  std::string lines = r.to_json().dump() + "\n";
  r.step = 1;
  r.task_loss = 2.25;
  lines += r.to_json().dump() + "\n";
  lines += r.to_json().dump().substr(0, 40);  // the writer died mid-line
  make_dirs(tmp.file("cut"));
  testing::write_bytes(tmp.file("cut/metrics.jsonl"), lines);
  const RunRecord run = read_run(tmp.file("cut"));
  ASSERT_EQ(run.steps.size(), 2u);
  const std::string html = render_report({run});
  const auto loss = svg::series_values(html, "cut");
  ASSERT_EQ(loss.size(), 2u);
  EXPECT_EQ(loss[1].second, 2.25);
  EXPECT_NE(html.find("<pre>"), std::string::npos) << "the summary of the steps so far";
}

}  // namespace
}  // namespace amaq::train

// `amaq study --plan PLAN.toml`: the AMAQ-against-fixed-precision study (issue 7; docs/results.md).
#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <thread>

#include "app/commands.h"
#include "app/config_toml.h"
#include "core/error.h"
#include "recipes/study.h"

namespace amaq::app {
namespace {

// The first line a shell command prints ("" when it fails).
std::string first_line_of(const char* command) {
  std::FILE* p = popen(command, "r");
  if (!p) return "";
  std::array<char, 256> buf{};
  std::string out = std::fgets(buf.data(), static_cast<int>(buf.size()), p) ? buf.data() : "";
  pclose(p);
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

std::string self_exe() {
  std::array<char, 4096> buf{};
  const ssize_t n = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (n <= 0)
    throw Error("cannot find the amaq executable (/proc/self/exe)", "run amaq from a Linux system with /proc mounted");
  return std::string(buf.data(), static_cast<size_t>(n));
}

}  // namespace

Run add_study(CLI::App& app) {
  struct Args {
    recipes::StudyOptions opt;
    std::string plan;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--plan", a->plan, "the study's plan (TOML): base model, tasks, codecs, seeds; see plans/small.toml")
      ->required();
  app.add_option("--out", a->opt.out, "the study's directory (runs are kept: a rerun runs only what is missing)")
      ->required();
  app.add_option("--jobs", a->opt.jobs, "runs at once, each with cores / jobs torch threads")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  app.add_option("--report", a->opt.report_dir, "also write results.md and its plots into this directory (e.g. docs)");
  app.add_flag("--report-only", a->opt.report_only, "start nothing: write the report from the runs there are");
  return [a] {
    const recipes::StudyPlan plan = recipes::StudyPlan::from_json(read_toml_json(a->plan), a->plan);
    a->opt.plan_path = a->plan;
    a->opt.exe = self_exe();
    a->opt.commit = first_line_of("git rev-parse --short HEAD 2>/dev/null");
    if (!a->opt.commit.empty() && !first_line_of("git status --porcelain --untracked-files=no 2>/dev/null").empty())
      a->opt.commit += " (with uncommitted changes)";
    const int failed = recipes::run_study(plan, a->opt);
    if (failed)
      fmt::print(stderr, "study: {} jobs failed or were skipped; rerun the same command to retry them\n", failed);
    return failed ? 1 : 0;
  };
}

}  // namespace amaq::app

// A run's report page (RUN/report.html, `amaq report`): one self-contained HTML file, inline SVG and
// CSS, no scripts, built from what the run directory holds (metrics.jsonl, run.json, config.toml, summary.txt).
// Several runs are overlaid in one page. Readable while a run is going: it reads what is there.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "train/metrics.h"

namespace amaq::train {

/// What the report shows of one run directory.
struct RunRecord {
  std::string dir, name;
  std::vector<StepRecord> steps;                  ///< a step logged twice (after a resume) keeps its last line
  std::vector<nlohmann::json> evals;              ///< every evaluation, in order (each carries its "step")
  nlohmann::json run = nlohmann::json::object();  ///< run.json: model, split, codecs, side (may be empty)
  std::string config;                             ///< config.toml as written (may be empty)
  std::string summary;                            ///< summary.txt, or the summary of the steps so far
};

/// Reads a run directory. Throws amaq::Error naming it when it holds no metrics.jsonl (not a run) or
/// no step yet; lines that do not parse (a line cut off by a crash) are skipped.
RunRecord read_run(const std::string& dir);

/// The page for `runs` (at least one).
std::string render_report(const std::vector<RunRecord>& runs);

/// read_run on each directory, render_report, written atomically to `out`.
void write_report(const std::vector<std::string>& dirs, const std::string& out);

}  // namespace amaq::train

// `amaq study`: does AMAQ beat fixed precision at the same bit budget? A plan (TOML, read by the
// app layer into JSON) names a base model (an existing one, or one amaq initialises and pretrains
// itself), tasks, codecs and seeds; the study runs every (task, codec, seed) as its own `amaq
// train` process, then the random-map ablation of every AMAQ run, and writes a report (markdown
// tables and SVG plots) from the runs' metrics. Finished runs are kept: rerunning a study only runs
// what is missing. docs/results.md is such a report.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "recipes/demo.h"

namespace amaq::recipes {

struct StudyCodec {
  std::string name;    ///< row label, e.g. "amaq-3"
  std::string family;  ///< none | fixed-token | fixed-group | aqsgd | amaq (plots and pairing group by it)
  std::string fwd, bwd;
  bool ablation = false;  ///< amaq only: also run `fixed:map=<learned map>,shuffle=...` (family amaq-random)
};

struct StudyTask {
  std::string name, data, val_data;
  std::string metric;  ///< the eval field that is the task's quality: accuracy | exact_match | perplexity
  int64_t seq_len = 128;
  int64_t train_limit =
      0;  ///< > 0: train on N records of `data`, evenly spaced through it (several epochs in a short run)
  nlohmann::json make_task;  ///< when set: {kind, train, val, seed} for `amaq make-task` instead of data files
};

struct StudyPlan {
  std::string name;
  std::string base_model;  ///< an HF model directory to fine-tune; empty: init + pretrain below
  PresetOptions init;
  uint64_t init_seed = 0;
  nlohmann::json pretrain;  ///< `amaq train` flags for pretraining (data, steps, ...), full weights, none:fp32
  int64_t split = 2;
  nlohmann::json finetune;  ///< `amaq train` flags shared by every grid run (steps, lr, lora_r, bwd_codec, ...)
  std::vector<uint64_t> seeds;
  std::vector<StudyTask> tasks;
  std::vector<StudyCodec> codecs;

  /// Checks every field; throws amaq::Error naming `where` and the field.
  static StudyPlan from_json(const nlohmann::json& j, const std::string& where);
};

struct StudyOptions {
  std::string out;           ///< the study's directory: base/, tasks/, runs/, logs/, report
  std::string exe;           ///< the amaq executable each run is started as
  int jobs = 1;              ///< runs at once (each with cores / jobs torch threads)
  bool report_only = false;  ///< write the report from the runs there are, start nothing
  std::string plan_path;     ///< for the report's reproduce line
  std::string report_dir;    ///< also write results.md + plots here (e.g. docs); empty: only OUT/report
  std::string commit;        ///< the source commit measured, for the report
};

/// Runs what is missing, then writes OUT/report/results.md and its plots (and to report_dir).
/// Returns the number of runs that failed (their logs named).
int run_study(const StudyPlan& plan, const StudyOptions& opt);

// ---- The report's pieces (exposed for tests) ----

/// One run as the report sees it, from RUN/metrics.jsonl.
struct RunStats {
  bool complete = false;
  int64_t steps = 0;
  double metric = 0, eval_loss = 0;
  double fwd_bits = 0, fwd_bits_last10 = 0;         ///< 8 x packet bytes / elements, whole run and last 10% of steps
  double bwd_bits = 0, bwd_bits_last10 = 0;         ///< the same for the gradients
  double fwd_mb_per_step = 0, bwd_mb_per_step = 0;  ///< whole frames
  bool diverged = false;
  int64_t spikes = 0;
  std::vector<double> task_loss, map_bits;  ///< per step
};

/// Reads a run; `metric` names the eval field. A missing or unfinished run has complete = false.
RunStats read_run_stats(const std::string& run_dir, const std::string& metric);

/// Steps whose task loss exceeds `factor` x the median of the `window` steps before (after the first window).
int64_t count_spikes(const std::vector<double>& loss, int window = 10, double factor = 2.0);

struct MeanStd {
  double mean = 0, std = 0;  ///< std: sample standard deviation (0 for one value)
  int64_t n = 0;
  /// The squared standard error of the mean, std^2 / n (0 without values).
  double mean_variance() const { return n ? std * std / static_cast<double>(n) : 0; }
};
MeanStd mean_std(const std::vector<double>& v);

/// A fixed-precision codec the report may pair an AMAQ codec with: its measured bits per element,
/// forward (activations) and backward (gradients).
struct PairCandidate {
  std::string name;
  double fwd_bits = 0, bwd_bits = 0;
};

/// The pairing rule of the report: among `candidates`, the one whose forward and backward bits are
/// both at or above `fwd_bits` and `bwd_bits` with the fewest in total (then the fewest forward);
/// empty when none reaches both.
std::string pair_at_or_above(double fwd_bits, double bwd_bits, const std::vector<PairCandidate>& candidates);

/// Whether the uncompressed baseline learned a task, as the report words it: "yes, ..." when its
/// mean over seeds (more than one) is more than two standard errors above `chance` (what answering
/// without learning scores), else "**no** ..." (the grid is void for that task).
std::string baseline_verdict(const MeanStd& baseline, double chance);

}  // namespace amaq::recipes

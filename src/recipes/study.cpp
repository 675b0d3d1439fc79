#include "recipes/study.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "core/fs.h"
#include "core/runtime.h"
#include "core/safetensors.h"
#include "core/svg.h"
#include "model/config.h"
#include "model/part.h"
#include "recipes/outliers.h"
#include "train/data.h"
#include "train/metrics.h"
#include "train/report.h"
#include "train/session.h"

namespace amaq::recipes {

using namespace train;  // the recipes are built on the trainer
namespace {

// ---- plan ----

std::string need_string(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j.contains(key) || !j[key].is_string() || j[key].get<std::string>().empty()) {
    throw Error(where + ": '" + key + "' is missing or not a non-empty string",
                "see plans/small.toml for a complete plan");
  }
  return j[key].get<std::string>();
}

int64_t int_or(const nlohmann::json& j, const char* key, int64_t def, const std::string& where) {
  if (!j.contains(key)) return def;
  if (!j[key].is_number_integer())
    throw Error(where + ": '" + key + "' must be an integer", "e.g. " + std::string(key) + " = " + std::to_string(def));
  return j[key].get<int64_t>();
}

bool is_higher_better(const std::string& metric) {
  return metric != "perplexity" && metric != "loss";
}

// `amaq train` flags from a table: lora_r = 8 -> --lora-r 8; true -> the bare flag; arrays joined by ','.
std::vector<std::string> flags_of(const nlohmann::json& table, const std::set<std::string>& reserved,
                                  const std::string& where) {
  std::vector<std::string> out;
  for (const auto& [k, v] : table.items()) {
    std::string flag = k;
    std::replace(flag.begin(), flag.end(), '_', '-');
    if (reserved.count(flag))
      throw Error(where + ": '" + k + "' is set by the study itself", "remove it from the plan");
    if (v.is_boolean()) {
      if (v.get<bool>()) out.push_back("--" + flag);
      continue;
    }
    out.push_back("--" + flag);
    if (v.is_string())
      out.push_back(v.get<std::string>());
    else if (v.is_array()) {
      std::string joined;
      for (const auto& e : v) joined += (joined.empty() ? "" : ",") + (e.is_string() ? e.get<std::string>() : e.dump());
      out.push_back(joined);
    } else if (v.is_number())
      out.push_back(v.dump());
    else
      throw Error(where + ": '" + k + "' has a value that is not a string, number, boolean or array",
                  "e.g. steps = 100");
  }
  return out;
}

const std::set<std::string> kStudyFlags{"model", "split",    "run-dir", "seed",  "fwd-codec",
                                        "quiet", "progress", "resume",  "config"};

}  // namespace

StudyPlan StudyPlan::from_json(const nlohmann::json& j, const std::string& where) {
  StudyPlan p;
  if (!j.is_object()) throw Error(where + ": the plan is not a table", "see plans/small.toml");
  static const std::set<std::string> kKeys{"name", "split", "seeds", "base", "pretrain", "finetune", "tasks", "codecs"};
  for (const auto& [k, v] : j.items()) {
    if (!kKeys.count(k))
      throw Error(where + ": unknown key '" + k + "'",
                  "known: name, split, seeds, [base], [pretrain], [finetune], [[tasks]], [[codecs]]");
  }
  p.name = j.value("name", std::string("study"));
  p.split = int_or(j, "split", 2, where);
  if (!j.contains("seeds") || !j["seeds"].is_array() || j["seeds"].empty())
    throw Error(where + ": 'seeds' must be a non-empty array", "e.g. seeds = [1, 2, 3]");
  for (const auto& s : j["seeds"]) {
    if (!s.is_number_unsigned()) throw Error(where + ": seeds must be non-negative integers", "e.g. seeds = [1, 2, 3]");
    p.seeds.push_back(s.get<uint64_t>());
  }
  const nlohmann::json base = j.value("base", nlohmann::json::object());
  const std::string bw = where + " [base]";
  p.base_model = base.value("model", std::string());
  if (p.base_model.empty()) {
    p.init.hidden = int_or(base, "hidden", p.init.hidden, bw);
    p.init.layers = int_or(base, "layers", p.init.layers, bw);
    p.init.heads = int_or(base, "heads", p.init.heads, bw);
    p.init.kv_heads = int_or(base, "kv_heads", p.init.kv_heads, bw);
    p.init.intermediate = int_or(base, "intermediate", p.init.intermediate, bw);
    p.init.max_positions = int_or(base, "max_positions", p.init.max_positions, bw);
    p.init_seed = static_cast<uint64_t>(int_or(base, "seed", 0, bw));
    p.pretrain = j.value("pretrain", nlohmann::json::object());
    need_string(p.pretrain, "data", where + " [pretrain]");
    flags_of(p.pretrain, kStudyFlags, where + " [pretrain]");
    if (p.split < 1 || p.split >= p.init.layers)
      throw Error(fmt::format("{}: split {} is outside 1..{}", where, p.split, p.init.layers - 1),
                  "the client keeps layers [0, split)");
  }
  p.finetune = j.value("finetune", nlohmann::json::object());
  flags_of(p.finetune, kStudyFlags, where + " [finetune]");
  for (const char* k : {"data", "val_data", "seq_len"}) {
    if (p.finetune.contains(k))
      throw Error(where + " [finetune]: '" + k + "' belongs to each [[tasks]] entry", "move it there");
  }
  if (!j.contains("tasks") || !j["tasks"].is_array() || j["tasks"].empty())
    throw Error(where + ": no [[tasks]]", "add at least one task");
  for (const auto& t : j["tasks"]) {
    const std::string tw = where + " [[tasks]]";
    StudyTask task;
    task.name = need_string(t, "name", tw);
    task.metric = need_string(t, "metric", tw + " " + task.name);
    task.seq_len = int_or(t, "seq_len", 128, tw);
    task.train_limit = int_or(t, "train_limit", 0, tw);
    if (t.contains("make_task")) {
      task.make_task = t["make_task"];
      need_string(task.make_task, "kind", tw + " " + task.name + " make_task");
    } else {
      task.data = need_string(t, "data", tw + " " + task.name);
      if (task.data.size() < 6 || task.data.substr(task.data.size() - 6) != ".jsonl") {
        if (task.train_limit > 0)
          throw Error(tw + " " + task.name + ": train_limit needs a .jsonl file",
                      "limit a .txt corpus by its size instead");
      }
      task.val_data = need_string(t, "val_data", tw + " " + task.name);
    }
    p.tasks.push_back(std::move(task));
  }
  if (!j.contains("codecs") || !j["codecs"].is_array() || j["codecs"].empty())
    throw Error(where + ": no [[codecs]]", "add at least one codec");
  std::set<std::string> names;
  for (const auto& c : j["codecs"]) {
    const std::string cw = where + " [[codecs]]";
    StudyCodec codec;
    codec.name = need_string(c, "name", cw);
    codec.family = need_string(c, "family", cw + " " + codec.name);
    codec.fwd = need_string(c, "fwd", cw + " " + codec.name);
    codec.bwd = c.value("bwd", p.finetune.value("bwd_codec", std::string("none:fp32")));
    codec.ablation = c.value("ablation", false);
    if (codec.ablation && codec.fwd.rfind("amaq", 0) != 0)
      throw Error(cw + " " + codec.name + ": ablation = true needs an amaq codec",
                  "the ablation replays a learned bit map");
    if (!names.insert(codec.name).second)
      throw Error(cw + ": codec name '" + codec.name + "' appears twice", "give each codec its own name");
    p.codecs.push_back(std::move(codec));
  }
  return p;
}

RunStats read_run_stats(const std::string& run_dir, const std::string& metric) {
  RunStats r;
  const std::string path = join_path(run_dir, "metrics.jsonl");
  if (!file_exists(path) || !file_exists(join_path(run_dir, "summary.txt"))) return r;
  const std::vector<StepRecord> steps = read_metrics(path);
  nlohmann::json eval;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains("eval")) eval = j["eval"];
  }
  if (steps.empty()) return r;
  r.complete = !eval.is_null();
  r.steps = static_cast<int64_t>(steps.size());
  r.metric = r.complete ? eval.value(metric, std::nan("")) : std::nan("");
  r.eval_loss = r.complete ? eval.value("loss", std::nan("")) : std::nan("");
  const size_t n = steps.size(), tail = static_cast<size_t>(std::floor(0.9 * static_cast<double>(n)));
  double fp = 0, bp = 0, el = 0, fp_t = 0, bp_t = 0, el_t = 0, fw = 0, bw = 0;
  for (size_t i = 0; i < n; ++i) {
    const StepRecord& s = steps[i];
    fp += static_cast<double>(s.fwd_packet_bytes), bp += static_cast<double>(s.bwd_packet_bytes),
        el += static_cast<double>(s.elements);
    fw += static_cast<double>(s.fwd_wire_bytes), bw += static_cast<double>(s.bwd_wire_bytes);
    if (i >= tail)
      fp_t += static_cast<double>(s.fwd_packet_bytes), bp_t += static_cast<double>(s.bwd_packet_bytes),
          el_t += static_cast<double>(s.elements);
    r.task_loss.push_back(s.task_loss);
    r.map_bits.push_back(s.fwd_bits.mean);
  }
  r.fwd_bits = el > 0 ? 8 * fp / el : 0;
  r.bwd_bits = el > 0 ? 8 * bp / el : 0;
  r.fwd_bits_last10 = el_t > 0 ? 8 * fp_t / el_t : 0;
  r.bwd_bits_last10 = el_t > 0 ? 8 * bp_t / el_t : 0;
  r.fwd_mb_per_step = fw / 1e6 / static_cast<double>(n);
  r.bwd_mb_per_step = bw / 1e6 / static_cast<double>(n);
  const size_t tenth = std::max<size_t>(1, n / 10);
  double first = 0, last = 0;
  for (size_t i = 0; i < tenth; ++i) first += r.task_loss[i], last += r.task_loss[n - 1 - i];
  r.diverged = !std::isfinite(first) || !std::isfinite(last) || last > first ||
               std::any_of(r.task_loss.begin(), r.task_loss.end(), [](double v) { return !std::isfinite(v); });
  r.spikes = count_spikes(r.task_loss);
  return r;
}

int64_t count_spikes(const std::vector<double>& loss, int window, double factor) {
  int64_t spikes = 0;
  for (size_t i = static_cast<size_t>(window); i < loss.size(); ++i) {
    std::vector<double> before(loss.begin() + static_cast<std::ptrdiff_t>(i) - window,
                               loss.begin() + static_cast<std::ptrdiff_t>(i));
    std::nth_element(before.begin(), before.begin() + window / 2, before.end());
    spikes += loss[i] > factor * before[static_cast<size_t>(window / 2)];
  }
  return spikes;
}

MeanStd mean_std(const std::vector<double>& v) {
  MeanStd m;
  m.n = static_cast<int64_t>(v.size());
  if (v.empty()) return m;
  for (double x : v) m.mean += x / static_cast<double>(v.size());
  if (v.size() > 1) {
    double ss = 0;
    for (double x : v) ss += (x - m.mean) * (x - m.mean);
    m.std = std::sqrt(ss / static_cast<double>(v.size() - 1));
  }
  return m;
}

std::string pair_at_or_above(double fwd_bits, double bwd_bits, const std::vector<PairCandidate>& candidates) {
  const PairCandidate* best = nullptr;
  for (const PairCandidate& c : candidates) {
    if (c.fwd_bits < fwd_bits || c.bwd_bits < bwd_bits) continue;
    const double total = c.fwd_bits + c.bwd_bits, best_total = best ? best->fwd_bits + best->bwd_bits : 0;
    if (!best || total < best_total || (total == best_total && c.fwd_bits < best->fwd_bits)) best = &c;
  }
  return best ? best->name : std::string();
}

std::string baseline_verdict(const MeanStd& baseline, double chance) {
  const double se = std::sqrt(baseline.mean_variance());
  if (baseline.n < 2 || !(baseline.mean - chance > 2 * se))
    return "**no** (not more than two standard errors above it, or one seed): this grid is void for this task, and "
           "the comparisons below measure nothing";
  return se > 0 ? fmt::format("yes, {:.1f} standard errors above it", (baseline.mean - chance) / se)
                : std::string("yes, every seed alike above it");
}

namespace {

// ---- running ----

struct Job {
  std::string label;
  std::vector<std::string> args;  ///< after the executable
  std::string done_file;          ///< exists once the job has finished well
  std::string clean_dir;          ///< removed before the job starts (a half-written run from an earlier attempt)
  std::string log;
  std::vector<size_t> deps;
  bool exclusive = false;  ///< runs alone with every core (pretraining)
  bool grid = false;       ///< a fine-tuning run (counts toward the ETA)
  enum State { kPending, kRunning, kDone, kFailed } state = kPending;
  pid_t pid = -1;
  std::chrono::steady_clock::time_point started;
};

Job make_job(std::string label, std::vector<std::string> args, std::string done_file, std::string clean_dir) {
  Job j;
  j.label = std::move(label), j.args = std::move(args), j.done_file = std::move(done_file),
  j.clean_dir = std::move(clean_dir);
  return j;
}

std::string shell_quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,+") ==
                        std::string::npos)
    return s;
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

pid_t spawn(const std::string& exe, const std::vector<std::string>& args, const std::string& log) {
  std::vector<std::string> all{exe};
  all.insert(all.end(), args.begin(), args.end());
  return spawn_process(all, log);
}

std::string duration_text(double s) {
  if (s < 60) return fmt::format("{:.0f}s", s);
  if (s < 3600) return fmt::format("{}m{:02d}s", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  return fmt::format("{}h{:02d}m", static_cast<int>(s) / 3600, (static_cast<int>(s) % 3600) / 60);
}

// Runs the jobs (those already done are skipped); returns the number that failed or were skipped
// because a job they need failed.
int run_jobs(std::vector<Job>& jobs, const StudyOptions& opt, int cores, JsonlLog& log) {
  const auto t0 = std::chrono::steady_clock::now();
  size_t todo = 0, finished = 0, grid_left = 0, grid_done = 0;
  double grid_seconds = 0;
  for (Job& j : jobs) {
    if (file_exists(j.done_file))
      j.state = Job::kDone;
    else
      ++todo, grid_left += j.grid;
  }
  fmt::print(stderr, "study: {} of {} jobs to run ({} already done), {} at a time\n", todo, jobs.size(),
             jobs.size() - todo, opt.jobs);
  int failed = 0, running = 0;
  bool exclusive_running = false;
  const int threads = std::max(1, cores / std::max(1, opt.jobs));
  for (;;) {
    for (Job& j : jobs) {
      if (j.state != Job::kPending) continue;
      bool ready = true, blocked = false;
      for (size_t d : j.deps) ready &= jobs[d].state == Job::kDone, blocked |= jobs[d].state == Job::kFailed;
      if (blocked) {
        j.state = Job::kFailed;
        ++failed, ++finished;
        fmt::print(stderr, "study: skipped {}: a job it needs failed\n", j.label);
        log.write({{"job", j.label}, {"status", "skipped"}});
        continue;
      }
      if (!ready || exclusive_running || running >= opt.jobs || (j.exclusive && running > 0)) continue;
      if (!j.clean_dir.empty()) remove_tree(j.clean_dir);
      std::vector<std::string> args = j.args;
      if (args.front() == "train")
        args.insert(args.begin(), {"--threads", std::to_string(j.exclusive ? cores : threads)});
      j.pid = spawn(opt.exe, args, j.log);
      j.state = Job::kRunning;
      j.started = std::chrono::steady_clock::now();
      ++running;
      exclusive_running |= j.exclusive;
      fmt::print(stderr, "study: [{}/{}] started {}\n", finished + 1, todo, j.label);
    }
    if (running == 0) break;
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      throw Error(std::string("waitpid: ") + std::strerror(errno), "");
    }
    for (Job& j : jobs) {
      if (j.state != Job::kRunning || j.pid != pid) continue;
      --running;
      exclusive_running &= !j.exclusive;
      ++finished;
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - j.started).count();
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0 && file_exists(j.done_file);
      j.state = ok ? Job::kDone : Job::kFailed;
      if (!ok) ++failed;
      if (j.grid) grid_seconds += secs, ++grid_done, --grid_left;
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double eta =
          grid_done ? grid_seconds / static_cast<double>(grid_done) * static_cast<double>(grid_left) / opt.jobs : 0;
      fmt::print(stderr, "study: [{}/{}] {} {} in {} (elapsed {}{})\n", finished, todo, ok ? "finished" : "FAILED",
                 j.label, duration_text(secs), duration_text(elapsed),
                 grid_done && grid_left ? ", about " + duration_text(eta) + " left" : "");
      if (!ok) fmt::print(stderr, "study: {} failed (exit status {}); its log: {}\n", j.label, status, j.log);
      log.write({{"job", j.label}, {"status", ok ? "ok" : "failed"}, {"seconds", secs}, {"log", j.log}});
    }
  }
  return failed;
}

// ---- report ----

struct Cell {  // one (task, codec): its seeds
  std::vector<RunStats> runs;
  MeanStd metric, eval_loss, fwd_bits, fwd_bits_last10, bwd_bits, bwd_bits_last10, fwd_mb, bwd_mb;
  int64_t diverged = 0, spiking = 0, incomplete = 0;
};

Cell make_cell(std::vector<RunStats> runs) {
  Cell c;
  std::vector<double> m, l, fb, fbl, bb, bbl, fm, bm;
  for (const RunStats& r : runs) {
    if (!r.complete) {
      ++c.incomplete;
      continue;
    }
    m.push_back(r.metric), l.push_back(r.eval_loss), fb.push_back(r.fwd_bits), fbl.push_back(r.fwd_bits_last10),
        bb.push_back(r.bwd_bits), bbl.push_back(r.bwd_bits_last10);
    fm.push_back(r.fwd_mb_per_step), bm.push_back(r.bwd_mb_per_step);
    c.diverged += r.diverged, c.spiking += r.spikes > 0;
  }
  c.metric = mean_std(m), c.eval_loss = mean_std(l), c.fwd_bits = mean_std(fb), c.fwd_bits_last10 = mean_std(fbl);
  c.bwd_bits = mean_std(bb), c.bwd_bits_last10 = mean_std(bbl), c.fwd_mb = mean_std(fm), c.bwd_mb = mean_std(bm);
  c.runs = std::move(runs);
  return c;
}

std::string pm(const MeanStd& m, int decimals, double scale = 1) {
  if (m.n == 0) return "-";
  return m.n > 1 ? fmt::format("{:.{}f} ± {:.{}f}", m.mean * scale, decimals, m.std * scale, decimals)
                 : fmt::format("{:.{}f}", m.mean * scale, decimals);
}

std::string md_table(const std::vector<std::vector<std::string>>& rows) {
  std::string o;
  for (size_t i = 0; i < rows.size(); ++i) {
    o += "|";
    for (const auto& c : rows[i]) o += " " + c + " |";
    o += "\n";
    if (i == 0) {
      o += "|";
      for (size_t k = 0; k < rows[i].size(); ++k) o += "---|";
      o += "\n";
    }
  }
  return o;
}

// Mean over seeds of a per-step series, smoothed by a trailing window.
std::vector<std::pair<double, double>> mean_curve(const std::vector<RunStats>& runs, bool bits, int smooth) {
  size_t n = 0;
  for (const auto& r : runs) n = std::max(n, (bits ? r.map_bits : r.task_loss).size());
  std::vector<std::pair<double, double>> out;
  std::vector<double> mean(n, 0.0);
  std::vector<int> count(n, 0);
  for (const auto& r : runs) {
    const auto& v = bits ? r.map_bits : r.task_loss;
    for (size_t i = 0; i < v.size(); ++i) mean[i] += v[i], ++count[i];
  }
  for (size_t i = 0; i < n; ++i) {
    double s = 0;
    int k = 0;
    for (size_t j = i + 1 >= static_cast<size_t>(smooth) ? i + 1 - static_cast<size_t>(smooth) : 0; j <= i; ++j) {
      if (count[j]) s += mean[j] / count[j], ++k;
    }
    if (k) out.emplace_back(static_cast<double>(i + 1), s / k);
  }
  return out;
}

struct ReportInput {
  const StudyPlan* plan;
  const StudyOptions* opt;
  std::vector<StudyCodec> codecs;                            // the plan's plus the ablations
  std::map<std::string, std::map<std::string, Cell>> cells;  // task -> codec -> cell
  nlohmann::json base;                                       // what the report says about the base model
  std::map<std::string, std::pair<double, std::string>>
      majority;  // classification task -> (share, label) of the evaluated rows
  double wall_seconds = 0;
  double pretrain_seconds = 0;  // from study.jsonl: its last successful run
  size_t jobs_run = 0;
  int failed = 0;
};

std::string metric_title(const std::string& metric) {
  if (metric == "accuracy") return "classification accuracy (%)";
  if (metric == "exact_match") return "exact match (%)";
  return metric;
}
double metric_scale(const std::string& metric) {
  return metric == "accuracy" || metric == "exact_match" || metric == "token_accuracy" ? 100 : 1;
}

// The task's markdown section; its plots go into `files` (file name -> contents).
std::string task_section(const ReportInput& in, const StudyTask& task, std::map<std::string, std::string>* files) {
  const auto& cells = in.cells.at(task.name);
  const double sc = metric_scale(task.metric);
  const bool higher = is_higher_better(task.metric);
  std::string o = fmt::format("## Task `{}`: {} ({} is better)\n\n", task.name, metric_title(task.metric),
                              higher ? "higher" : "lower");
  // What answering without learning scores: the majority label of a classification task, else 0.
  double chance = 0;
  if (const auto m = in.majority.find(task.name); m != in.majority.end()) {
    const auto& [share, label] = m->second;
    chance = share;
    o += fmt::format("Always answering the majority label `{}` scores {:.1f}% on the evaluated rows.\n\n", label,
                     100 * share);
  }
  // The uncompressed baseline must learn the task, or no comparison below means anything.
  for (const StudyCodec& c : in.codecs) {
    const MeanStd& b = cells.at(c.name).metric;
    if (c.family != "none" || !b.n || !higher) continue;
    o += fmt::format("**Did the baseline learn?** {} (`{}`) scores {} against {:.1f}{} without learning: {}.\n\n",
                     c.name, c.fwd, pm(b, 1, sc), sc * chance, sc == 100 ? "%" : "", baseline_verdict(b, chance));
  }
  std::vector<std::vector<std::string>> rows{{"codec", "activations (forward)", "eff. bits", "bits, last 10%",
                                              "grad. bits", "grad. bits, last 10%", "MB/step fwd", "MB/step bwd",
                                              metric_title(task.metric), "val loss", "diverged", "spiking", "runs"}};
  for (const StudyCodec& c : in.codecs) {
    const Cell& cell = cells.at(c.name);
    rows.push_back(
        {c.name, "`" + (c.family == "amaq-random" ? std::string("fixed:map=<learned map>,shuffle") : c.fwd) + "`",
         pm(cell.fwd_bits, 2), pm(cell.fwd_bits_last10, 2), pm(cell.bwd_bits, 2), pm(cell.bwd_bits_last10, 2),
         pm(cell.fwd_mb, 3), pm(cell.bwd_mb, 3), pm(cell.metric, 1, sc), pm(cell.eval_loss, 4),
         std::to_string(cell.diverged), std::to_string(cell.spiking),
         fmt::format("{}{}", cell.metric.n, cell.incomplete ? fmt::format(" ({} missing)", cell.incomplete) : "")});
  }
  o += md_table(rows) + "\n";

  // Pairing: each AMAQ codec against a fixed-precision codec at or above its measured bits both ways
  // (pair_at_or_above).
  std::vector<PairCandidate> fixed;
  for (const StudyCodec& c : in.codecs) {
    const Cell& cell = cells.at(c.name);
    if (c.family.rfind("fixed", 0) == 0 && cell.fwd_bits.n)
      fixed.push_back({c.name, cell.fwd_bits.mean, cell.bwd_bits.mean});
  }
  // The pairing and the ablation, on one quality measure (`get`), in one direction.
  auto comparisons = [&](const std::string& title, const std::function<const MeanStd&(const Cell&)>& get, double scale,
                         bool up, int decimals) {
    std::vector<std::vector<std::string>> pairs{{"AMAQ", "eff. bits", "grad. bits", title, "fixed precision",
                                                 "eff. bits", "grad. bits", title, "AMAQ − fixed", "2 × SE",
                                                 "verdict"}};
    std::vector<std::vector<std::string>> abl{{"AMAQ (learned map)", "eff. bits", title, "random map, same histogram",
                                               "eff. bits", title, "learned − random", "2 × SE", "verdict"}};
    auto compare = [&](const Cell& a, const Cell& b, const char* win, const char* lose) {
      const MeanStd &ma = get(a), &mb = get(b);
      const double d = (ma.mean - mb.mean) * scale;
      const double se = std::sqrt(ma.mean_variance() + mb.mean_variance()) * scale;
      std::string verdict = std::abs(d) <= 2 * se || d == 0 ? "tie (within noise)" : (up ? d > 0 : d < 0) ? win : lose;
      if (ma.n < 2 || mb.n < 2) verdict += " (one seed: no noise estimate)";
      return std::tuple{fmt::format("{:+.{}f}", d, decimals), fmt::format("{:.{}f}", 2 * se, decimals), verdict};
    };
    for (const StudyCodec& c : in.codecs) {
      if (c.family != "amaq" || !get(cells.at(c.name)).n) continue;
      const Cell& a = cells.at(c.name);
      const std::string f = pair_at_or_above(a.fwd_bits.mean, a.bwd_bits.mean, fixed);
      if (f.empty()) {
        pairs.push_back({c.name, pm(a.fwd_bits, 2), pm(a.bwd_bits, 2), pm(get(a), decimals, scale),
                         "none at or above these bits", "-", "-", "-", "-", "-", "-"});
      } else {
        const Cell& b = cells.at(f);
        auto [d, se, v] = compare(a, b, "AMAQ better", "AMAQ worse");
        pairs.push_back({c.name, pm(a.fwd_bits, 2), pm(a.bwd_bits, 2), pm(get(a), decimals, scale), f,
                         pm(b.fwd_bits, 2), pm(b.bwd_bits, 2), pm(get(b), decimals, scale), d, se, v});
      }
      const auto r = cells.find(c.name + "-random");
      if (c.ablation && r != cells.end() && get(r->second).n) {
        auto [d, se, v] = compare(a, r->second, "learned better", "learned worse");
        abl.push_back({c.name, pm(a.fwd_bits, 2), pm(get(a), decimals, scale), r->first, pm(r->second.fwd_bits, 2),
                       pm(get(r->second), decimals, scale), d, se, v});
      }
    }
    std::string t = "### AMAQ against fixed precision at the same or more measured bits: " + title + "\n\n" +
                    md_table(pairs) + "\n";
    if (abl.size() > 1)
      t += "### Learned map against a random map with the same histogram: " + title + "\n\n" + md_table(abl) + "\n";
    return t;
  };
  o +=
      "Each AMAQ codec is paired with the fixed-precision codec (per token or per group) whose measured bits, "
      "averaged over the run, are at or above AMAQ's in both directions (activations forward, gradients back), with "
      "the fewest in total. A difference within twice its standard error (over seeds) is a tie. "
      "The ablation's random-map run sends each channel at one width for the whole run: the AMAQ run's final map with "
      "its channels "
      "shuffled (`fixed:map=RUN/fwd_bit_map.json,shuffle=SEED` with the AMAQ codec's `gran`/`group`); the AMAQ run's "
      "budget walked down from 8 bits, so it sent more "
      "bits early on (compare the bits columns). Both comparisons are made on the task's measure and on the validation "
      "loss "
      "(the completion's mean negative log-likelihood per byte), which moves before accuracy does.\n\n";
  o += comparisons(
      metric_title(task.metric), [](const Cell& c) -> const MeanStd& { return c.metric; }, sc, higher, 1);
  o += comparisons(
      "val loss", [](const Cell& c) -> const MeanStd& { return c.eval_loss; }, 1, false, 4);

  // Plots.
  std::vector<svg::Series> pareto, loss, bits;
  std::vector<svg::Series> by_bytes;
  std::map<std::string, std::vector<std::pair<double, double>>> by_family, bytes_by_family;
  for (const StudyCodec& c : in.codecs) {
    const Cell& cell = cells.at(c.name);
    if (!cell.metric.n) continue;
    by_family[c.family].emplace_back(cell.fwd_bits.mean, cell.metric.mean * sc);
    bytes_by_family[c.family].emplace_back(cell.fwd_mb.mean + cell.bwd_mb.mean, cell.metric.mean * sc);
  }
  size_t fi = 0;
  for (auto& [fam, pts] : by_family) {
    std::sort(pts.begin(), pts.end());
    auto& bytes = bytes_by_family[fam];
    std::sort(bytes.begin(), bytes.end());
    pareto.push_back({fam, svg::palette(fi), pts, true, true, fam == "amaq-random"});
    by_bytes.push_back({fam, svg::palette(fi++), bytes, true, true, fam == "amaq-random"});
  }
  size_t ci = 0;
  for (const StudyCodec& c : in.codecs) {
    const Cell& cell = cells.at(c.name);
    if (!cell.metric.n) continue;
    const std::string color = svg::palette(ci);
    const bool dashed = ci++ >= 10;
    loss.push_back({c.name, color, mean_curve(cell.runs, false, 5), true, false, dashed});
    if (c.family != "none") bits.push_back({c.name, color, mean_curve(cell.runs, true, 1), true, false, dashed});
  }
  const std::string base = task.name;
  (*files)[base + "-pareto.svg"] = svg::plot(
      {fmt::format("{}: {} against measured forward bits (mean over seeds)", task.name, metric_title(task.metric)),
       "effective bits per activation element (whole run)", metric_title(task.metric)},
      pareto);
  (*files)[base + "-bytes.svg"] =
      svg::plot({fmt::format("{}: {} against MB sent per step, both directions (mean over seeds)", task.name,
                             metric_title(task.metric)),
                 "MB per step (activations + gradients, whole frames)", metric_title(task.metric)},
                by_bytes);
  (*files)[base + "-loss.svg"] =
      svg::plot({task.name + ": training loss (mean over seeds, 5-step average)", "step", "task loss"}, loss);
  (*files)[base + "-bits.svg"] =
      svg::plot({task.name + ": mean forward bit-width of the map per step", "step", "bits"}, bits);
  o += fmt::format(
      "![{0}: quality against bits]({0}-pareto.svg)\n\n![{0}: quality against bytes]({0}-bytes.svg)\n\n"
      "![{0}: loss]({0}-loss.svg)\n\n![{0}: bits]({0}-bits.svg)\n\n",
      base);
  return o;
}

// results.md and its plots, by file name.
std::map<std::string, std::string> render_report(const ReportInput& in) {
  std::map<std::string, std::string> files;
  const StudyPlan& p = *in.plan;
  std::string o = "# Study results: AMAQ against fixed precision at equal measured bits\n\n";
  o += "Generated by `amaq study` from the runs' own metrics (nothing here is typed by hand). ";
  o += fmt::format(
      "Plan `{}` ({}), runs made at commit `{}`, {} machine with {} cores, {} runs at a time. Time: {}"
      "pretraining, a job that runs alone on every core, took {} (`{}/study.jsonl` has every job's duration){}.\n\n",
      p.name, in.opt->plan_path, in.base.value("commit", std::string("?")), in.base.value("machine", std::string("?")),
      in.base.value("cores", 0), in.opt->jobs,
      in.opt->report_only ? std::string()
                          : fmt::format("this invocation ran {} jobs in {} of wall time; ", in.jobs_run,
                                        duration_text(in.wall_seconds)),
      in.pretrain_seconds > 0 ? duration_text(in.pretrain_seconds) : std::string("-"), in.opt->out,
      in.failed ? fmt::format(" ({} jobs failed or were skipped: see the logs)", in.failed) : "");
  o += "Reproduce: `bash scripts/fetch-study-data.sh && build/amaq study --plan " + in.opt->plan_path + " --out " +
       in.opt->out +
       fmt::format(" --jobs {}{}`. Every command the study runs, in order, is in `{}/commands.sh`{}.\n\n", in.opt->jobs,
                   in.opt->report_dir.empty() ? "" : " --report " + in.opt->report_dir, in.opt->out,
                   in.opt->report_dir.empty()
                       ? ""
                       : fmt::format(" (a copy: `{}`)", join_path(in.opt->report_dir, "results-commands.sh")));
  o += "## Setup\n\n";
  o += in.base.value("text", std::string());
  o += fmt::format("- Fine-tuning: split after layer {}; seeds {}; every run uses these `amaq train` flags: `{}`.\n",
                   p.split, nlohmann::json(p.seeds).dump(),
                   fmt::format("{}", fmt::join(flags_of(p.finetune, {}, ""), " ")));
  for (const StudyTask& t : p.tasks) {
    o += t.make_task.is_null()
             ? fmt::format(
                   "- Task `{}`: `{}`{} (validation `{}`), {} tokens per sequence, scored by {}.\n", t.name, t.data,
                   t.train_limit > 0 ? fmt::format(", {} of its records evenly spaced through the file", t.train_limit)
                                     : "",
                   t.val_data, t.seq_len, t.metric)
             : fmt::format("- Task `{}`: generated by `amaq make-task` {}, {} tokens per sequence, scored by {}.\n",
                           t.name, t.make_task.dump(), t.seq_len, t.metric);
  }
  o += "- *eff. bits*: 8 × the codec's packet bytes (header, scales and bit map included) / activation elements, over "
       "the whole run; "
       "*bits, last 10%*: the same over the last tenth of the steps. MB/step counts whole frames. *grad. bits* and "
       "*grad. bits, last 10%*: the same for the gradients going back.\n"
       "- *diverged*: a non-finite loss, or the mean task loss of the last 10% of steps above that of the first 10%. "
       "*spiking*: runs "
       "with a step whose loss exceeds twice the median of the 10 steps before it.\n\n";
  o += fmt::format(
      "- Each cell's runs, seeds overlaid (loss, bits, bytes, time, AMAQ's bit map): "
      "`{}/report/cells/TASK-CODEC.html`, "
      "drawn by `amaq report`.\n\n",
      in.opt->out);
  for (const StudyTask& t : p.tasks) o += task_section(in, t, &files);
  files["results.md"] = o;
  return files;
}

std::string machine_name() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

}  // namespace

int run_study(const StudyPlan& plan, const StudyOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  make_dirs(join_path(opt.out, "logs"));
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<Job> jobs;
  auto add = [&](Job j) {
    j.log = join_path(join_path(opt.out, "logs"), j.label + ".log");
    for (char& c : j.log) c = c == ' ' ? '_' : c;
    jobs.push_back(std::move(j));
    return jobs.size() - 1;
  };
  std::string base_model = plan.base_model;
  std::vector<size_t> base_deps;
  if (base_model.empty()) {
    const std::string init = join_path(opt.out, "base/init"), pre = join_path(opt.out, "base/pretrain");
    base_model = join_path(opt.out, "base/model");
    const auto& b = plan.init;
    const size_t ji =
        add(make_job("base-init",
                     {"init-model", "--out", init, "--hidden", std::to_string(b.hidden), "--layers",
                      std::to_string(b.layers), "--heads", std::to_string(b.heads), "--kv-heads",
                      std::to_string(b.kv_heads), "--intermediate", std::to_string(b.intermediate), "--max-positions",
                      std::to_string(b.max_positions), "--seed", std::to_string(plan.init_seed)},
                     join_path(init, "model.safetensors"), init));
    std::vector<std::string> args{"train",       "--model",   init,          "--split",   std::to_string(plan.split),
                                  "--run-dir",   pre,         "--tokenizer", "byte",      "--full",
                                  "--fwd-codec", "none:fp32", "--bwd-codec", "none:fp32", "--quiet"};
    for (auto& f : flags_of(plan.pretrain, kStudyFlags, "pretrain")) args.push_back(f);
    Job jp = make_job("base-pretrain", args, join_path(pre, "summary.txt"), pre);
    jp.deps = {ji};
    jp.exclusive = true;
    const size_t jpi = add(jp);
    Job je = make_job("base-export", {"export", "--run-dir", pre, "--out", base_model, "--merged"},
                      join_path(base_model, "model.safetensors"), base_model);
    je.deps = {jpi};
    base_deps = {add(je)};
  }
  std::map<std::string, std::pair<std::string, std::string>> task_files;
  std::map<std::string, std::vector<size_t>> task_deps;
  for (const StudyTask& t : plan.tasks) {
    task_deps[t.name] = base_deps;
    if (t.make_task.is_null()) {
      task_files[t.name] = {t.data, t.val_data};
      for (const std::string& f : {t.data, t.val_data}) {
        if (!file_exists(f))
          throw Error("task " + t.name + ": " + f + " does not exist",
                      "fetch the study's data first: bash scripts/fetch-study-data.sh");
      }
      if (t.train_limit > 0) {  // N records evenly spaced through the file, so that a short run sees each several times
                                // (AQ-SGD's setting)
        const std::string dir = join_path(opt.out, "tasks/" + t.name), path = join_path(dir, "train.jsonl");
        std::vector<std::string> lines;
        std::ifstream src(t.data);
        for (std::string line; std::getline(src, line);) {
          if (!line.empty()) lines.push_back(line);
        }
        const auto total = static_cast<int64_t>(lines.size()), keep = std::min(t.train_limit, total);
        std::string subset;
        for (int64_t i = 0; i < total; ++i) {
          if ((i + 1) * keep / total > i * keep / total) subset += lines[static_cast<size_t>(i)] + "\n";
        }
        make_dirs(dir);
        if (!file_exists(path) || read_file(path) != subset) write_file_atomic(path, subset);
        task_files[t.name].first = path;
      }
      continue;
    }
    const std::string dir = join_path(opt.out, "tasks/" + t.name);
    task_files[t.name] = {join_path(dir, "train.jsonl"), join_path(dir, "val.jsonl")};
    std::vector<std::string> args{"make-task", "--out", dir};
    for (auto& f : flags_of(t.make_task, {"out"}, "make_task")) args.push_back(f);
    task_deps[t.name].push_back(add(make_job("task-" + t.name, args, join_path(dir, "val.jsonl"), dir)));
  }
  std::vector<StudyCodec> codecs = plan.codecs;
  for (const StudyCodec& c : plan.codecs) {
    if (c.ablation) codecs.push_back({c.name + "-random", "amaq-random", "", c.bwd, false});
  }
  auto plan_codec = [&](const std::string& name) -> const StudyCodec& {
    return *std::find_if(plan.codecs.begin(), plan.codecs.end(), [&](const StudyCodec& c) { return c.name == name; });
  };
  auto run_dir = [&](const std::string& task, const std::string& codec, uint64_t seed) {
    return join_path(opt.out, fmt::format("runs/{}/{}/seed-{}", task, codec, seed));
  };
  std::map<std::string, size_t> run_job;
  for (const StudyTask& t : plan.tasks) {
    for (const StudyCodec& c : codecs) {
      for (uint64_t seed : plan.seeds) {
        const std::string dir = run_dir(t.name, c.name, seed);
        std::string fwd = c.fwd;
        std::vector<size_t> deps = task_deps[t.name];
        if (c.family == "amaq-random") {
          const std::string learned = c.name.substr(0, c.name.size() - 7);
          fwd = fmt::format("fixed:map={},shuffle={}", join_path(run_dir(t.name, learned, seed), "fwd_bit_map.json"),
                            1000 + seed);
          // The same ranges as the AMAQ codec (its gran= and group=), so that only the allocation differs.
          std::istringstream opts(plan_codec(learned).fwd.substr(plan_codec(learned).fwd.find(':') + 1));
          for (std::string kv; std::getline(opts, kv, ',');) {
            if (kv.rfind("gran=", 0) == 0 || kv.rfind("group=", 0) == 0) fwd += "," + kv;
          }
          deps.push_back(run_job.at(fmt::format("{}/{}/{}", t.name, learned, seed)));
        }
        std::vector<std::string> args{"train",
                                      "--model",
                                      base_model,
                                      "--split",
                                      std::to_string(plan.split),
                                      "--run-dir",
                                      dir,
                                      "--data",
                                      task_files[t.name].first,
                                      "--val-data",
                                      task_files[t.name].second,
                                      "--seq-len",
                                      std::to_string(t.seq_len),
                                      "--seed",
                                      std::to_string(seed),
                                      "--fwd-codec",
                                      fwd,
                                      "--bwd-codec",
                                      c.bwd,
                                      "--quiet"};
        nlohmann::json ft = plan.finetune;
        ft.erase("bwd_codec");
        if (!ft.contains("tokenizer")) ft["tokenizer"] = "byte";
        for (auto& f : flags_of(ft, kStudyFlags, "finetune")) args.push_back(f);
        Job j = make_job(fmt::format("{}-{}-seed{}", t.name, c.name, seed), args, join_path(dir, "summary.txt"), dir);
        j.deps = deps;
        j.grid = true;
        run_job[fmt::format("{}/{}/{}", t.name, c.name, seed)] = add(j);
      }
    }
  }
  {
    std::string sh =
        "#!/usr/bin/env bash\n# Every command of this study, in the order it starts them (generated by amaq "
        "study).\nset -e\n";
    for (const Job& j : jobs) {
      sh += "amaq";
      if (j.args.front() == "train")
        sh += " --threads " + std::to_string(j.exclusive ? cores : std::max(1, cores / std::max(1, opt.jobs)));
      for (const auto& a : j.args) sh += " " + shell_quote(a);
      sh += "\n";
    }
    write_file_atomic(join_path(opt.out, "commands.sh"), sh);
    if (!opt.report_dir.empty()) {
      make_dirs(opt.report_dir);
      write_file_atomic(join_path(opt.report_dir, "results-commands.sh"), sh);
    }
  }
  JsonlLog log(join_path(opt.out, "study.jsonl"));
  int failed = 0;
  const size_t to_run = static_cast<size_t>(
      std::count_if(jobs.begin(), jobs.end(), [](const Job& j) { return !file_exists(j.done_file); }));
  if (!opt.report_only) failed = run_jobs(jobs, opt, cores, log);

  // The report.
  ReportInput in;
  in.plan = &plan;
  in.opt = &opt;
  in.codecs = codecs;
  in.failed = failed;
  in.jobs_run = to_run;
  // The commit the runs were made at: recorded when jobs ran, kept by --report-only.
  const std::string commit_file = join_path(opt.out, "commit.txt");
  if (!opt.report_only && !opt.commit.empty()) write_file_atomic(commit_file, opt.commit);
  in.base = {{"machine", machine_name()},
             {"cores", cores},
             {"commit", file_exists(commit_file) ? read_file(commit_file)
                        : opt.commit.empty()     ? std::string("unknown")
                                                 : opt.commit}};
  {
    std::map<std::string, double> last_ok;
    std::ifstream f(join_path(opt.out, "study.jsonl"));
    for (std::string line; std::getline(f, line);) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.value("status", std::string()) == "ok")
        last_ok[j.value("job", std::string())] = j.value("seconds", 0.0);
    }
    if (last_ok.count("base-pretrain")) in.pretrain_seconds = last_ok["base-pretrain"];
  }
  std::string text;
  if (file_exists(join_path(base_model, "config.json"))) {
    const ModelConfig mc = ModelConfig::load(base_model);
    int64_t params = 0;
    const CheckpointReader reader(base_model);
    for (const auto& [name, bytes] : reader.sizes()) {
      int64_t n = 1;
      for (int64_t d : reader.info(name).shape) n *= d;
      params += n;
    }
    text += fmt::format(
        "- Base model `{}`: Llama-style, {} layers, hidden {}, {} heads ({} key/value), MLP {}, vocabulary {} (byte "
        "tokenizer), "
        "{:.2f}M parameters.\n",
        base_model, mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads, mc.intermediate_size, mc.vocab_size,
        params / 1e6);
    if (plan.base_model.empty()) {
      const std::string pre = join_path(opt.out, "base/pretrain");
      const RunStats ps = read_run_stats(pre, "perplexity");
      const int64_t batch = plan.pretrain.value("batch", int64_t{8}),
                    seq = plan.pretrain.value("seq_len", int64_t{128});
      text += fmt::format(
          "- Pretrained from scratch by amaq itself (`amaq init-model`, then `amaq train --full` on both sides with "
          "`none:fp32` across "
          "the split, then `amaq export --merged`) on `{}`: {} steps × {} sequences × {} bytes = {:.1f}M tokens; "
          "training "
          "loss {:.3f} → {:.3f} nats per byte (first and last step){}{}.\n",
          plan.pretrain.value("data", std::string()), ps.steps, batch, seq,
          static_cast<double>(ps.steps * batch * seq) / 1e6, ps.task_loss.empty() ? 0.0 : ps.task_loss.front(),
          ps.task_loss.empty() ? 0.0 : ps.task_loss.back(),
          ps.complete ? fmt::format("; validation loss {:.3f} nats per byte ({:.2f} bits per byte)", ps.eval_loss,
                                    ps.eval_loss / std::log(2.0))
                      : "",
          ps.diverged ? ", **the loss did not fall**" : "");
      const std::string val = plan.pretrain.value("val_data", plan.pretrain.value("data", std::string()));
      const ByteTokenizer tok;
      const std::vector<ChannelOutliers> before = boundary_outliers(join_path(opt.out, "base/init"), val, tok, 128, 64),
                                         after = boundary_outliers(base_model, val, tok, 128, 64);
      const ChannelOutliers &b = before.at(plan.split - 1), &a = after.at(plan.split - 1);
      text += fmt::format(
          "- Outlier channels of the split activation (the hidden state after layer {}, 64 × 128 bytes of `{}`): the "
          "largest channel's mean |h| is {:.1f}× the median channel's ({:.1f}× for the per-channel maxima), channels "
          "{}; before pretraining {:.1f}× ({:.1f}×).\n",
          plan.split, val, a.mean_ratio, a.max_ratio, nlohmann::json(a.top).dump(), b.mean_ratio, b.max_ratio);
      std::string all;
      for (size_t i = 0; i < after.size(); ++i) {
        all += fmt::format("{}after layer {}: {:.1f}× ({:.1f}×; before pretraining {:.1f}×)", i ? ", " : "",
                           after[i].split, after[i].mean_ratio, after[i].max_ratio, before[i].mean_ratio);
      }
      text += fmt::format(
          "- The same at every layer boundary (`amaq outliers`): {}. Hardest to quantize: after layer {}.\n", all,
          hardest_split(after));
    }
  }
  in.base["text"] = text;
  // The majority-label rate of the rows a classification eval scores (the first eval_batches x batch).
  for (const StudyTask& t : plan.tasks) {
    const std::string val = task_files[t.name].second;
    if (t.metric != "accuracy" || !file_exists(val)) continue;
    const int64_t limit = plan.finetune.value("eval_batches", int64_t{0}) * plan.finetune.value("batch", int64_t{8});
    std::map<std::string, int64_t> counts;
    int64_t n = 0;
    std::ifstream f(val);
    for (std::string line; (limit <= 0 || n < limit) && std::getline(f, line);) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.contains("label")) continue;
      ++counts[j["label"].is_string() ? j["label"].get<std::string>() : j["label"].dump()], ++n;
    }
    const auto best = std::max_element(counts.begin(), counts.end(),
                                       [](const auto& a, const auto& b) { return a.second < b.second; });
    if (n > 0) in.majority[t.name] = {static_cast<double>(best->second) / static_cast<double>(n), best->first};
  }
  for (const StudyTask& t : plan.tasks) {
    for (const StudyCodec& c : codecs) {
      std::vector<RunStats> runs;
      for (uint64_t seed : plan.seeds) runs.push_back(read_run_stats(run_dir(t.name, c.name, seed), t.metric));
      in.cells[t.name][c.name] = make_cell(std::move(runs));
    }
  }
  in.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string report_dir = join_path(opt.out, "report");
  // Each grid cell's runs (its seeds overlaid) as one page: OUT/report/cells/TASK-CODEC.html.
  for (const StudyTask& t : plan.tasks) {
    for (const StudyCodec& c : codecs) {
      std::vector<std::string> dirs;
      for (uint64_t seed : plan.seeds) {
        const std::string d = run_dir(t.name, c.name, seed);
        if (file_exists(join_path(d, "summary.txt"))) dirs.push_back(d);
      }
      if (dirs.empty()) continue;
      make_dirs(join_path(report_dir, "cells"));
      try {
        train::write_report(dirs, join_path(report_dir, fmt::format("cells/{}-{}.html", t.name, c.name)));
      } catch (const Error& e) {
        spdlog::warn("no page for {} / {}: {}", t.name, c.name, e.what());
      }
    }
  }
  const auto files = render_report(in);
  for (const std::string& dir : {report_dir, opt.report_dir}) {
    if (dir.empty()) continue;
    make_dirs(dir);
    for (const auto& [name, text] : files) write_file_atomic(join_path(dir, name), text);
  }
  // The summary table at the end: each codec's measured bits and quality, per task.
  std::vector<std::vector<std::string>> table{
      {"task", "codec", "eff. bits", "bits, last 10%", "quality", "val loss", "runs"}};
  for (const StudyTask& t : plan.tasks) {
    for (const StudyCodec& c : codecs) {
      const Cell& cell = in.cells[t.name][c.name];
      table.push_back({t.name, c.name, pm(cell.fwd_bits, 2), pm(cell.fwd_bits_last10, 2),
                       cell.metric.n ? t.metric + " " + pm(cell.metric, 1, metric_scale(t.metric)) : "-",
                       pm(cell.eval_loss, 3), std::to_string(cell.metric.n)});
    }
  }
  fmt::print("{}report: {}{}\n", format_table(table), join_path(report_dir, "results.md"),
             opt.report_dir.empty() ? "" : " and " + join_path(opt.report_dir, "results.md"));
  return failed;
}

}  // namespace amaq::recipes

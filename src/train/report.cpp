#include "train/report.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "core/svg.h"

namespace amaq::train {
namespace {

std::string base_name(const std::string& dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const size_t slash = d.rfind('/');
  return slash == std::string::npos ? d : d.substr(slash + 1);
}

using Points = std::vector<std::pair<double, double>>;

svg::Series series(const std::string& label, size_t colour, Points points, bool dashed = false) {
  svg::Series s;
  s.label = label;
  s.color = svg::palette(colour);
  s.points = std::move(points);
  s.dashed = dashed;
  s.markers = s.points.size() == 1;
  return s;
}

// A plot of f(step record) against the step, one series per run.
template <typename F>
std::vector<svg::Series> per_run(const std::vector<RunRecord>& runs, F f, const std::string& suffix = "") {
  std::vector<svg::Series> out;
  for (size_t i = 0; i < runs.size(); ++i) {
    Points p;
    for (const StepRecord& r : runs[i].steps) p.emplace_back(static_cast<double>(r.step + 1), f(r));
    out.push_back(series(runs[i].name + suffix, i, std::move(p)));
  }
  return out;
}

std::string figure(const std::string& title, const std::string& x, const std::string& y,
                   const std::vector<svg::Series>& s) {
  svg::PlotOptions o;
  o.title = title;
  o.x_label = x;
  o.y_label = y;
  return "<figure>" + svg::plot(o, s) + "</figure>\n";
}

// The accuracy-like figure an evaluation reports, if any.
std::string eval_metric(const nlohmann::json& e) {
  for (const char* k : {"exact_match", "accuracy", "token_accuracy"})
    if (e.contains(k) && e[k].is_number()) return k;
  return "";
}

// The AMAQ forward map over the run: channels binned to at most 128 columns, steps to at most 100 rows.
std::string bit_map_figure(const RunRecord& run) {
  std::vector<std::pair<int64_t, std::vector<int64_t>>> maps;
  for (const StepRecord& r : run.steps)
    if (!r.fwd_map.empty()) maps.emplace_back(r.step + 1, decode_bit_map(r.fwd_map));
  if (maps.empty()) return "";
  const size_t C = maps.front().second.size();
  const size_t cols = std::min<size_t>(C, 128), rows = std::min<size_t>(maps.size(), 100);
  std::vector<std::vector<double>> cells(rows, std::vector<double>(cols, 0.0));
  double lo = 1e9, hi = -1e9;
  for (size_t r = 0; r < rows; ++r) {
    const size_t s0 = r * maps.size() / rows, s1 = std::max(s0 + 1, (r + 1) * maps.size() / rows);
    for (size_t c = 0; c < cols; ++c) {
      const size_t c0 = c * C / cols, c1 = std::max(c0 + 1, (c + 1) * C / cols);
      double sum = 0;
      size_t n = 0;
      for (size_t s = s0; s < s1; ++s) {
        const auto& m = maps[s].second;
        for (size_t k = c0; k < c1 && k < m.size(); ++k) sum += static_cast<double>(m[k]), ++n;
      }
      cells[r][c] = n ? sum / static_cast<double>(n) : 0.0;
      lo = std::min(lo, cells[r][c]), hi = std::max(hi, cells[r][c]);
    }
  }
  svg::HeatmapOptions o;
  o.title = run.name + ": forward bits per channel over the run";
  o.x_label = fmt::format(
      "channel ({} channels{})", C,
      cols < C ? fmt::format(", {:.3g} per column", static_cast<double>(C) / static_cast<double>(cols)) : "");
  o.y_label = "step";
  o.top_label = std::to_string(maps.front().first);
  o.bottom_label = std::to_string(maps.back().first);
  o.unit = "bits";
  o.vmin = std::floor(lo), o.vmax = std::max(std::ceil(hi), o.vmin + 1);
  return "<figure>" + svg::heatmap(o, cells) + "</figure>\n";
}

std::string table(const std::vector<std::vector<std::string>>& rows) {
  std::string o = "<table>\n";
  for (size_t r = 0; r < rows.size(); ++r) {
    o += "<tr>";
    for (const auto& cell : rows[r]) o += fmt::format(r == 0 ? "<th>{}</th>" : "<td>{}</td>", svg::escape(cell));
    o += "</tr>\n";
  }
  return o + "</table>\n";
}

}  // namespace

RunRecord read_run(const std::string& dir) {
  const std::string metrics = join_path(dir, "metrics.jsonl");
  if (!file_exists(metrics))
    throw Error(dir + " is not a run directory (it has no metrics.jsonl)",
                "pass the --run-dir of an amaq train/client run");
  RunRecord run;
  run.dir = dir;
  run.name = base_name(dir);
  try {
    run.steps = read_metrics(metrics);
  } catch (const nlohmann::json::exception& e) {
    throw Error(metrics + " holds a step line with a field of the wrong type: " + e.what(),
                "the metrics file is damaged");
  }
  if (run.steps.empty()) throw Error(metrics + " holds no step yet", "wait for the run's first step, or check the run");
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.contains("eval") && j["eval"].is_object())
      run.evals.push_back(j["eval"]);
  }
  const std::string cfg = join_path(dir, "config.toml"), sum = join_path(dir, "summary.txt");
  if (file_exists(cfg)) run.config = read_file(cfg);
  const std::string run_json = join_path(dir, "run.json");
  if (file_exists(run_json)) {
    const auto j = nlohmann::json::parse(read_file(run_json), nullptr, false);
    if (j.is_object()) run.run = j;
  }
  run.summary =
      file_exists(sum) ? read_file(sum) : summarize(run.steps, run.evals.empty() ? nlohmann::json() : run.evals.back());
  return run;
}

std::string render_report(const std::vector<RunRecord>& runs) {
  if (runs.empty()) throw Error("a report needs at least one run", "pass one or more run directories");
  std::string names;
  for (const auto& r : runs) names += (names.empty() ? "" : ", ") + r.name;
  std::string o = fmt::format(R"(<!doctype html>
<html><head><meta charset="utf-8"><title>amaq report: {0}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1600px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
figure {{ display: inline-block; margin: 0.5em; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; }}
pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; }}
</style></head><body>
<h1>amaq report: {0}</h1>
)",
                              svg::escape(names));

  o += "<h2>Training loss</h2>\n";
  o += figure("task loss per step", "step", "loss", per_run(runs, [](const StepRecord& r) { return r.task_loss; }));
  {
    std::vector<svg::Series> s;
    for (size_t i = 0; i < runs.size(); ++i) {
      Points p;
      double t = 0;
      for (const StepRecord& r : runs[i].steps) p.emplace_back(t += r.step_seconds, r.task_loss);
      s.push_back(series(runs[i].name, i, std::move(p)));
    }
    o += figure("task loss against wall time", "seconds of training", "loss", s);
  }

  bool any_eval = false;
  for (const auto& r : runs) any_eval = any_eval || !r.evals.empty();
  if (any_eval) {
    o += "<h2>Validation</h2>\n";
    std::vector<svg::Series> loss, metric;
    std::string metric_name;
    for (size_t i = 0; i < runs.size(); ++i) {
      Points l, m;
      for (const auto& e : runs[i].evals) {
        const double step = e.value("step", 0.0);
        if (e.contains("loss") && e["loss"].is_number()) l.emplace_back(step, e["loss"].get<double>());
        const std::string k = eval_metric(e);
        if (!k.empty()) m.emplace_back(step, e[k].get<double>()), metric_name = k;
      }
      loss.push_back(series(runs[i].name, i, std::move(l)));
      if (!m.empty()) metric.push_back(series(runs[i].name, i, std::move(m)));
    }
    o += figure("validation loss", "step", "loss", loss);
    if (!metric.empty()) o += figure("validation " + metric_name, "step", metric_name, metric);
  }

  o += "<h2>Bits per element on the wire</h2>\n";
  for (const bool fwd : {true, false}) {
    std::vector<svg::Series> s;
    for (size_t i = 0; i < runs.size(); ++i) {
      Points mean, lo, hi;
      for (const StepRecord& r : runs[i].steps) {
        const BitsStats& b = fwd ? r.fwd_bits : r.bwd_bits;
        const double x = static_cast<double>(r.step + 1);
        mean.emplace_back(x, b.mean), lo.emplace_back(x, b.min), hi.emplace_back(x, b.max);
      }
      s.push_back(series(runs[i].name + " mean", i, std::move(mean)));
      s.push_back(series(runs[i].name + " min", i, std::move(lo), true));
      s.push_back(series(runs[i].name + " max", i, std::move(hi), true));
    }
    o += figure(fwd ? "forward (activations)" : "backward (gradients)", "step", "bits per element", s);
  }

  o += "<h2>Bytes per step</h2>\n";
  {
    std::vector<svg::Series> s;
    for (size_t i = 0; i < runs.size(); ++i) {
      Points f, b, bf16;
      for (const StepRecord& r : runs[i].steps) {
        const double x = static_cast<double>(r.step + 1);
        f.emplace_back(x, static_cast<double>(r.fwd_wire_bytes) / 1e6);
        b.emplace_back(x, static_cast<double>(r.bwd_wire_bytes) / 1e6);
        bf16.emplace_back(x, 2.0 * static_cast<double>(r.elements) / 1e6);
      }
      s.push_back(series(runs[i].name + " forward", i, std::move(f)));
      s.push_back(series(runs[i].name + " backward", i, std::move(b), true));
      if (i == 0) s.push_back(series("bf16 would send", 7, std::move(bf16), true));
    }
    o += figure("bytes on the wire each way, against bf16 packets", "step", "MB per step", s);
  }

  o += "<h2>Where each step's time goes</h2>\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    std::vector<svg::Series> s;
    auto add = [&](const std::string& label, size_t colour, auto f) {
      Points p;
      for (const StepRecord& r : runs[i].steps) p.emplace_back(static_cast<double>(r.step + 1), f(r));
      s.push_back(series(label, colour, std::move(p)));
    };
    add("step", 7, [](const StepRecord& r) { return r.step_seconds; });
    add("client compute", 0, [](const StepRecord& r) { return r.client_seconds - r.client_codec_seconds; });
    add("client codec", 1, [](const StepRecord& r) { return r.client_codec_seconds; });
    add("network", 2, [](const StepRecord& r) { return r.network_seconds; });
    add("server compute", 3, [](const StepRecord& r) { return r.server_seconds - r.server_codec_seconds; });
    add("server codec", 4, [](const StepRecord& r) { return r.server_codec_seconds; });
    o += figure(runs[i].name + ": seconds per step", "step", "seconds", s);
  }

  std::string maps;
  for (const auto& r : runs) maps += bit_map_figure(r);
  if (!maps.empty()) o += "<h2>AMAQ: the learned forward bit map</h2>\n" + maps;

  o += "<h2>Runs</h2>\n";
  for (const auto& r : runs) {
    o += fmt::format("<h3>{}</h3>\n<p>{} ({} steps logged)</p>\n<pre>{}</pre>\n", svg::escape(r.name),
                     svg::escape(r.dir), r.steps.size(), svg::escape(r.summary));
    std::vector<std::vector<std::string>> what{{"run", "value"}};
    for (const auto& [k, v] : r.run.items()) what.push_back({k, v.is_string() ? v.get<std::string>() : v.dump()});
    if (what.size() > 1) o += table(what);
    std::vector<std::vector<std::string>> cfg{{"option", "value"}};
    std::istringstream in(r.config);
    for (std::string line; std::getline(in, line);) {
      const size_t eq = line.find(" = ");
      if (line.empty() || line[0] == '#' || eq == std::string::npos) continue;
      cfg.push_back({line.substr(0, eq), line.substr(eq + 3)});
    }
    if (cfg.size() > 1) o += table(cfg);
  }
  return o + "</body></html>\n";
}

void write_report(const std::vector<std::string>& dirs, const std::string& out) {
  std::vector<RunRecord> runs;
  for (const auto& d : dirs) runs.push_back(read_run(d));
  write_file_atomic(out, render_report(runs));
}

}  // namespace amaq::train

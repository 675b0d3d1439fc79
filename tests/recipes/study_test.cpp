// The study (`amaq study`): its statistics and pairing rule against hand-computable cases, the SVG
// plots' coordinates against the axis mapping, plan errors, and a tiny plan run end to end as real
// `amaq` processes (pretraining included), resumed, and reported.
#include "recipes/study.h"

#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>

#include "core/fs.h"
#include "core/svg.h"
#include "testing.h"

namespace amaq::recipes {
namespace {

TEST(Svg, NiceAxisCoversTheRangeWithOneTwoOrFiveSteps) {
  for (auto [lo, hi] :
       std::vector<std::pair<double, double>>{{0, 1}, {2.7, 16.04}, {-3.2, 0.4}, {0.93, 0.97}, {5, 5}, {0, 1234}}) {
    const svg::Axis a = svg::nice_axis(lo, hi);
    ASSERT_GE(a.ticks.size(), 2u) << lo << ".." << hi;
    EXPECT_LE(a.lo, lo);
    EXPECT_GE(a.hi, hi);
    EXPECT_DOUBLE_EQ(a.ticks.front(), a.lo);
    EXPECT_NEAR(a.ticks.back(), a.hi, 1e-9 * std::max(1.0, std::abs(a.hi)));
    const double step = a.ticks[1] - a.ticks[0];
    const double mantissa = step / std::pow(10.0, std::floor(std::log10(step) + 1e-9));
    EXPECT_TRUE(std::abs(mantissa - 1) < 1e-6 || std::abs(mantissa - 2) < 1e-6 || std::abs(mantissa - 5) < 1e-6)
        << "step " << step;
    EXPECT_LE(a.ticks.size(), 12u);
  }
}

TEST(Svg, PointsLandWhereTheAxesPutThem) {
  // x in [0, 10] and y in [0, 5] are already nice, so they span the plot area exactly:
  // left 64, right width - 210, top 34, bottom height - 48.
  svg::Series s{"a <b> & c", "#123456", {{0, 0}, {10, 5}, {5, std::nan("")}}, true, true, false};
  const std::string doc = svg::plot({"t", "x", "y", 760, 420}, {s});
  EXPECT_NE(doc.find("points=\"64.0,372.0 550.0,34.0\""), std::string::npos) << doc;
  EXPECT_NE(doc.find("<circle cx=\"550.0\" cy=\"34.0\""), std::string::npos);
  EXPECT_NE(doc.find("a &lt;b&gt; &amp; c"), std::string::npos);
  EXPECT_EQ(doc.find("nan"), std::string::npos);
  EXPECT_EQ(doc.rfind("<svg", 0), 0u);
  EXPECT_NE(doc.find("</svg>"), std::string::npos);
}

TEST(Study, MeanStdSpikesAndPairing) {
  const MeanStd m = mean_std({1, 2, 3, 4});
  EXPECT_DOUBLE_EQ(m.mean, 2.5);
  EXPECT_NEAR(m.std, std::sqrt(5.0 / 3.0), 1e-12);
  EXPECT_EQ(mean_std({7}).std, 0);
  std::vector<double> loss(30, 1.0);
  EXPECT_EQ(count_spikes(loss), 0);
  loss[15] = 2.5;
  EXPECT_EQ(count_spikes(loss), 1);
  loss[5] = 9;  // inside the first window: never judged itself, and one high value leaves the later medians alone
  EXPECT_EQ(count_spikes(loss), 1);
  std::vector<double> falling(40);
  std::iota(falling.rbegin(), falling.rend(), 1.0);
  EXPECT_EQ(count_spikes(falling), 0);

  // Gradients at 8.17 bits throughout: the forward bits decide.
  const std::vector<PairCandidate> fixed{{"f4", 4.17, 8.17}, {"f3", 3.17, 8.17}, {"f2", 2.17, 8.17}, {"g4", 4.5, 8.17}};
  EXPECT_EQ(pair_at_or_above(3.5, 8.17, fixed), "f4");
  EXPECT_EQ(pair_at_or_above(3.17, 8.17, fixed), "f3");
  EXPECT_EQ(pair_at_or_above(1.0, 8.17, fixed), "f2");
  EXPECT_EQ(pair_at_or_above(4.6, 8.17, fixed), "");
  EXPECT_EQ(pair_at_or_above(3.0, 8.2, fixed), "");  // no candidate sends that many gradient bits
  // Both directions: the fewest total bits at or above in each, then the fewest forward bits.
  const std::vector<PairCandidate> both{
      {"f4b8", 4.17, 8.17}, {"f4b6", 4.17, 6.17}, {"f3b6", 3.17, 6.17}, {"f3b4", 3.17, 4.17}, {"f5b4", 5.17, 4.17}};
  EXPECT_EQ(pair_at_or_above(3.1, 6.0, both), "f3b6");  // not f3b4 (too few gradient bits), not f4b6 (more bits)
  EXPECT_EQ(pair_at_or_above(3.1, 4.0, both), "f3b4");
  EXPECT_EQ(pair_at_or_above(4.0, 4.0, both), "f5b4");  // 9.34 in total, f4b6 10.34
  EXPECT_EQ(pair_at_or_above(4.0, 7.0, both), "f4b8");
  const std::vector<PairCandidate> tied{{"a", 5.0, 5.0}, {"b", 4.0, 6.0}};
  EXPECT_EQ(pair_at_or_above(3.0, 3.0, tied), "b");  // equal totals: the fewer forward bits
}

TEST(Study, BaselineLearnedOnlyBeyondTwoStandardErrorsOfChance) {
  const auto learned = [](const MeanStd& b, double chance) { return baseline_verdict(b, chance).rfind("yes", 0) == 0; };
  // The small plan's bf16: 0.809 ± 0.056 over 5 seeds against 0.647: (0.809 - 0.647) / (0.056 / sqrt 5) = 6.5 SE.
  EXPECT_EQ(baseline_verdict({0.809, 0.056, 5}, 0.647), "yes, 6.5 standard errors above it");
  EXPECT_FALSE(learned({0.70, 0.10, 4}, 0.647));  // 1.1 SE
  EXPECT_TRUE(learned({0.76, 0.10, 4}, 0.647));   // 2.26 SE
  EXPECT_FALSE(learned({0.90, 0.0, 1}, 0.647));   // one seed: no noise estimate
  EXPECT_EQ(baseline_verdict({0.5, 0.0, 3}, 0.0), "yes, every seed alike above it");
  EXPECT_FALSE(learned({0.0, 0.0, 3}, 0.0));  // exact match 0 on every seed
  EXPECT_NE(baseline_verdict({0.3, 0.2, 2}, 0.4).find("void"), std::string::npos);
}

nlohmann::json tiny_plan() {
  return nlohmann::json::parse(R"({
    "name": "tiny", "split": 1, "seeds": [1, 2],
    "base": {"hidden": 32, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 64, "max_positions": 128},
    "pretrain": {"data": "corpus.txt", "steps": 6, "batch": 4, "seq_len": 32, "lr": 0.003},
    "finetune": {"steps": 8, "batch": 4, "lr": 0.002, "lora_r": 4, "eval_batches": 2,
                 "bwd_codec": "fixed:bits=8,gran=token"},
    "tasks": [{"name": "wp", "make_task": {"kind": "word-problems", "train": 40, "val": 8, "seed": 3},
               "seq_len": 112, "metric": "exact_match"}],
    "codecs": [
      {"name": "bf16", "family": "none", "fwd": "none:bf16", "bwd": "none:bf16"},
      {"name": "fixed-4-token", "family": "fixed-token", "fwd": "fixed:bits=4,gran=token"},
      {"name": "amaq-3", "family": "amaq", "fwd": "amaq:budget=3,gran=group,group=16,decay=3", "ablation": true}]
  })");
}

TEST(Study, PlanErrorsNameTheField) {
  auto bad = [](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = tiny_plan();
    edit(j);
    return j;
  };
  EXPECT_AMAQ_ERROR(StudyPlan::from_json(bad([](auto& j) { j.erase("seeds"); }), "p.toml"), "p.toml", "seeds");
  EXPECT_AMAQ_ERROR(StudyPlan::from_json(bad([](auto& j) { j["sedes"] = 1; }), "p.toml"), "unknown key 'sedes'");
  EXPECT_AMAQ_ERROR(StudyPlan::from_json(bad([](auto& j) { j["codecs"][1]["ablation"] = true; }), "p.toml"),
                    "fixed-4-token", "ablation");
  EXPECT_AMAQ_ERROR(StudyPlan::from_json(bad([](auto& j) { j["codecs"][2]["name"] = "bf16"; }), "p.toml"),
                    "'bf16' appears twice");
  EXPECT_AMAQ_ERROR(StudyPlan::from_json(bad([](auto& j) { j["finetune"]["run_dir"] = "x"; }), "p.toml"), "run_dir",
                    "set by the study");
  EXPECT_AMAQ_ERROR(StudyPlan::from_json(bad([](auto& j) { j["split"] = 2; }), "p.toml"), "split 2");
  EXPECT_AMAQ_ERROR(StudyPlan::from_json(bad([](auto& j) { j["tasks"][0].erase("metric"); }), "p.toml"), "metric");
}

TEST(IntegrationStudy, TinyPlanRunsEndToEndResumesAndReports) {
  testing::TempDir tmp;
  // The pretraining corpus: a few sentences of plain text.
  std::string text;
  for (int i = 0; i < 60; ++i) text += "The jury said the election was conducted well, and the city thanked it. ";
  testing::write_bytes(tmp.file("corpus.txt"), text);
  nlohmann::json pj = tiny_plan();
  pj["pretrain"]["data"] = tmp.file("corpus.txt");
  const StudyPlan plan = StudyPlan::from_json(pj, "tiny");
  StudyOptions opt;
  opt.out = tmp.file("study");
  opt.exe = AMAQ_BINARY;
  opt.jobs = 2;
  opt.plan_path = "tiny.toml";
  opt.report_dir = tmp.file("docs");
  opt.commit = "test";
  ASSERT_EQ(run_study(plan, opt), 0) << read_file(join_path(opt.out, "study.jsonl"));

  for (const char* f :
       {"base/model/model.safetensors", "base/pretrain/summary.txt", "tasks/wp/train.jsonl", "commands.sh"}) {
    EXPECT_TRUE(file_exists(join_path(opt.out, f))) << f;
  }
  // Measured bits against the codecs' own arithmetic: C = 32 channels, per-token fp16 lo/hi ranges.
  const RunStats bf16 = read_run_stats(join_path(opt.out, "runs/wp/bf16/seed-1"), "exact_match");
  const RunStats f4 = read_run_stats(join_path(opt.out, "runs/wp/fixed-4-token/seed-1"), "exact_match");
  ASSERT_TRUE(bf16.complete && f4.complete);
  EXPECT_EQ(bf16.steps, 8);
  EXPECT_GE(bf16.fwd_bits, 16.0);
  EXPECT_LT(bf16.fwd_bits, 16.5);
  EXPECT_GE(f4.fwd_bits, 4.0 + 32.0 / 32);
  EXPECT_LT(f4.fwd_bits, 4.0 + 32.0 / 32 + 0.5);
  EXPECT_NEAR(f4.bwd_bits, f4.fwd_bits + 4, 0.2);                // gradients at 8 bits, same layout
  EXPECT_NEAR(f4.bwd_bits_last10, f4.fwd_bits_last10 + 4, 0.2);  // the same over the last tenth of the steps
  // The task's metric is the run's last evaluation: an exact-match fraction over its validation rows.
  nlohmann::json bf16_eval;
  std::istringstream log(read_file(join_path(opt.out, "runs/wp/bf16/seed-1/metrics.jsonl")));
  for (std::string line; std::getline(log, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("eval")) bf16_eval = j["eval"];
  }
  ASSERT_TRUE(bf16_eval.contains("exact_match") && bf16_eval.contains("sequences"));
  const double rows = bf16_eval["sequences"].get<double>();
  ASSERT_GT(rows, 0);
  EXPECT_EQ(bf16.metric, bf16_eval["exact_match"].get<double>());
  EXPECT_NEAR(bf16.metric * rows, std::round(bf16.metric * rows), 1e-9);
  // The ablation replays the learned map's histogram: the same mean width, every step.
  for (uint64_t seed : {1, 2}) {
    const RunStats a = read_run_stats(join_path(opt.out, fmt::format("runs/wp/amaq-3/seed-{}", seed)), "exact_match");
    const RunStats r =
        read_run_stats(join_path(opt.out, fmt::format("runs/wp/amaq-3-random/seed-{}", seed)), "exact_match");
    ASSERT_TRUE(a.complete && r.complete);
    const auto map = nlohmann::json::parse(
        read_file(join_path(opt.out, fmt::format("runs/wp/amaq-3/seed-{}/fwd_bit_map.json", seed))));
    double mean = 0;
    for (const auto& b : map) mean += b.get<double>() / static_cast<double>(map.size());
    EXPECT_NEAR(a.map_bits.back(), mean, 1e-9);
    for (double b : r.map_bits) EXPECT_NEAR(b, mean, 1e-9);
    EXPECT_NEAR(r.fwd_bits_last10, a.fwd_bits_last10,
                0.05);  // the same ranges (group=16) as the AMAQ codec: only the allocation differs
    EXPECT_LE(mean, 3.0 + 1e-9);
  }
  const std::string md = read_file(join_path(opt.out, "report/results.md"));
  for (const char* s : {"| bf16 |", "| fixed-4-token |", "| amaq-3 |", "| amaq-3-random |", "wp-pareto.svg",
                        // 8 steps learn nothing: the report says the grid is void
                        "**Did the baseline learn?** bf16 (`none:bf16`) scores ", "this grid is void for this task",
                        "grad. bits, last 10%", "Outlier channels",
                        "at every layer boundary (`amaq outliers`): after layer 1:", "Hardest to quantize: after layer",
                        "commit `test`"}) {
    EXPECT_NE(md.find(s), std::string::npos) << s;
  }
  for (const char* f :
       {"results.md", "results-commands.sh", "wp-pareto.svg", "wp-bytes.svg", "wp-loss.svg", "wp-bits.svg"})
    EXPECT_TRUE(file_exists(join_path(opt.report_dir, f))) << f;
  EXPECT_EQ(read_file(join_path(opt.report_dir, "results.md")), md);
  // Each cell's runs as one page, its seeds overlaid.
  const std::string cell = read_file(join_path(opt.out, "report/cells/wp-amaq-3.html"));
  EXPECT_EQ(svg::series_values(cell, "seed-1").size(), 8u);
  EXPECT_EQ(svg::series_values(cell, "seed-2").size(), 8u);

  // A rerun starts nothing; a run that lost its summary is run again, and only it.
  auto lines = [&] {
    std::istringstream in(read_file(join_path(opt.out, "study.jsonl")));
    int n = 0;
    for (std::string l; std::getline(in, l);) ++n;
    return n;
  };
  const int before = lines();
  ASSERT_EQ(run_study(plan, opt), 0);
  EXPECT_EQ(lines(), before);
  remove_tree(join_path(opt.out, "runs/wp/bf16/seed-2"));
  ASSERT_EQ(run_study(plan, opt), 0);
  EXPECT_EQ(lines(), before + 1);
  EXPECT_TRUE(read_run_stats(join_path(opt.out, "runs/wp/bf16/seed-2"), "exact_match").complete);
}

TEST(IntegrationStudyCli, MalformedPlanIsNamed) {
#if !AMAQ_HAVE_TOML
  GTEST_SKIP() << "this build has no toml++: `amaq study` cannot read plans";
#else
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("p.toml"), "name = \"x\"\nseeds = [1]\nbogus = 3\n");
  std::string out;
  EXPECT_NE(testing::run_command(
                std::string(AMAQ_BINARY) + " study --plan " + tmp.file("p.toml") + " --out " + tmp.file("o"), &out),
            0);
  EXPECT_NE(out.find("unknown key 'bogus'"), std::string::npos) << out;
  testing::write_bytes(tmp.file("q.toml"), "name = \"x\nseeds = [1]\n");
  EXPECT_NE(testing::run_command(
                std::string(AMAQ_BINARY) + " study --plan " + tmp.file("q.toml") + " --out " + tmp.file("o"), &out),
            0);
  EXPECT_NE(out.find("not valid TOML"), std::string::npos) << out;
#endif
}

}  // namespace
}  // namespace amaq::recipes

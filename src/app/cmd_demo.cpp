// amaq demo: the whole idea on a laptop-sized problem, nothing to download. A small Llama-style
// model learns to reverse strings of 10 letters from scratch (or reversed-sum addition), split
// after layer 2, server and client over loopback TCP with a token; three runs (AMAQ, bf16, fixed
// 4-bit) side by side.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>

#include "app/commands.h"
#include "core/fs.h"
#include "core/hash.h"
#include "recipes/demo.h"
#include "train/report.h"
#include "train/session.h"
#include "wire/tcp.h"

namespace amaq::app {
namespace {

struct DemoArgs {
  std::string dir = "demo-run";
  std::string task = "reverse";
  int64_t length = 10;
  int64_t steps = 600, batch = 32, digits = 2, train_examples = 4000, val_examples = 400;
  double lr = 3e-3;
  uint64_t seed = 1;
  // Activations walk from 8 to 3.5 bits on average in 100 steps; gradients, whose map is the
  // activation map's ranking shifted to their budget, stay within 5..7 bits (a wider 4..8 range
  // trained markedly worse here: see README).
  std::string amaq_fwd = "amaq:budget=3.5,bmin=2,init=8,decay=100,gran=token";
  std::string amaq_bwd = "amaq:budget=6,bmin=5,bmax=7,init=7,decay=100,gran=token";
  bool quiet = false;
  std::vector<std::string> only;
};

struct Variant {
  std::string name, fwd, bwd;
};

int run_demo(const DemoArgs& a) {
  const auto t_start = std::chrono::steady_clock::now();
  const std::string model = join_path(a.dir, "model"), data = join_path(a.dir, "data");
  recipes::write_preset_model(model, recipes::PresetOptions{}, a.seed);
  if (a.task == "add")
    recipes::write_addition_task(data, static_cast<int>(a.digits), a.train_examples, a.val_examples, a.seed);
  else
    recipes::write_reversal_task(data, static_cast<int>(a.length), a.train_examples, a.val_examples, a.seed);
  fmt::print(
      stderr,
      "demo: a 4-layer Llama (hidden 128, byte tokenizer) learns {} from scratch, split after layer 2;\n"
      "      {} steps x {} problems per run, server and client over loopback TCP with a token. Model and data in {}\n",
      a.task == "add" ? fmt::format("{}-digit addition", a.digits)
                      : fmt::format("to reverse {}-letter strings", a.length),
      a.steps, a.batch, a.dir);
  const std::vector<Variant> variants{{"amaq", a.amaq_fwd, a.amaq_bwd},
                                      {"bf16", "none:bf16", "none:bf16"},
                                      {"fixed-4bit", "fixed:bits=4,gran=token", "fixed:bits=4,gran=token"}};
  std::vector<std::vector<std::string>> table{{"transport", "exact match", "val loss", "MB fwd", "MB bwd", "MB total",
                                               "vs bf16", "bits fwd", "bits bwd", "seconds"}};
  std::vector<train::RunResult> results;
  std::vector<double> seconds;
  for (const Variant& v : variants) {
    if (!a.only.empty() && std::find(a.only.begin(), a.only.end(), v.name) == a.only.end()) {
      results.emplace_back();
      seconds.push_back(0);
      continue;
    }
    const auto t0 = std::chrono::steady_clock::now();
    const std::string run = join_path(a.dir, v.name);
    remove_tree(run);
    fmt::print(stderr, "\n== {}: forward {}, backward {}\n", v.name, v.fwd, v.bwd);
    train::ServerConfig sc;
    sc.model = model;
    sc.split = 2;
    sc.run_dir = join_path(run, "server");
    sc.side.full = true;
    sc.fwd_codec = quant::CodecSpec::parse(v.fwd);
    sc.bwd_codec = quant::CodecSpec::parse(v.bwd);
    sc.token = random_hex(32);
    train::TrainServer srv(sc);
    wire::Server server(srv.tcp_options(0),
                        [&](wire::Channel& ch, const wire::SessionContext& ctx) { srv.serve(ch, ctx); });
    train::ClientConfig c;
    c.model = model;
    c.split = 2;
    c.run_dir = run;
    c.data = join_path(data, "train.jsonl");
    c.val_data = join_path(data, "val.jsonl");
    c.tokenizer = "byte";
    c.batch = a.batch;
    c.seq_len = 32;
    c.side.full = true;
    c.schedule.steps = a.steps;
    c.schedule.lr = a.lr;
    c.schedule.warmup = a.steps / 20;
    c.schedule.weight_decay = 0.01;
    c.schedule.clip = 1.0;
    c.schedule.seed = a.seed;
    c.fwd_codec = quant::CodecSpec::parse(v.fwd);
    c.bwd_codec = quant::CodecSpec::parse(v.bwd);
    c.token = sc.token;
    c.quiet = a.quiet;
    results.push_back(train::ClientTrainer(c).run([&](std::unique_ptr<wire::Channel>* out) {
      return wire::connect(wire::ClientOptions("127.0.0.1", server.port()).max_payload(srv.max_payload()), out);
    }));
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  auto total_bytes = [](const train::RunResult& r, bool fwd) {
    uint64_t b = 0;
    for (const auto& s : r.steps) b += fwd ? s.fwd_wire_bytes : s.bwd_wire_bytes;
    return b;
  };
  // Bytes against the bf16 run's; "-" when --only left it out.
  const double bf16_total = static_cast<double>(total_bytes(results[1], true) + total_bytes(results[1], false));
  for (size_t i = 0; i < variants.size(); ++i) {
    const auto& r = results[i];
    if (r.steps.empty()) continue;  // left out with --only
    double fb = 0, bb = 0;
    for (const auto& s : r.steps)
      fb += s.fwd_bits.mean / static_cast<double>(r.steps.size()),
          bb += s.bwd_bits.mean / static_cast<double>(r.steps.size());
    const uint64_t f = total_bytes(r, true), b = total_bytes(r, false);
    table.push_back({variants[i].name, fmt::format("{:.1f}%", 100 * r.eval.value("exact_match", 0.0)),
                     fmt::format("{:.4f}", r.eval.value("loss", 0.0)), fmt::format("{:.2f}", f / 1e6),
                     fmt::format("{:.2f}", b / 1e6), fmt::format("{:.2f}", (f + b) / 1e6),
                     bf16_total > 0 ? fmt::format("{:.1f}%", 100.0 * static_cast<double>(f + b) / bf16_total) : "-",
                     fmt::format("{:.2f}", fb), fmt::format("{:.2f}", bb), fmt::format("{:.0f}", seconds[i])});
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  fmt::print("\n{} validation problems, exact match of the whole answer (greedy = argmax at every answer position)\n",
             a.val_examples);
  fmt::print("{}", train::format_table(table));
  fmt::print(
      "runs in {}/{{amaq,bf16,fixed-4bit}} (metrics.jsonl, summary.txt, report.html, checkpoints, server/), {:.0f} s "
      "in "
      "all\n",
      a.dir, total);
  std::vector<std::string> ran;
  for (const Variant& v : variants)
    if (a.only.empty() || std::find(a.only.begin(), a.only.end(), v.name) != a.only.end())
      ran.push_back(join_path(a.dir, v.name));
  const std::string page = join_path(a.dir, "report.html");
  train::write_report(ran, page);
  fmt::print(
      "\nthe three runs side by side (loss, bits, bytes, time, AMAQ's bit map): {}\n"
      "next, fine-tune a HuggingFace checkpoint directory across two processes:\n"
      "  amaq server --model MODEL_DIR --split 2 --run-dir server-runs --listen 127.0.0.1:7000 \\\n"
      "      --fwd-codec amaq:budget=4 --bwd-codec amaq:budget=6 &\n"
      "  amaq client --model MODEL_DIR --split 2 --connect 127.0.0.1:7000 --data train.jsonl --run-dir run \\\n"
      "      --fwd-codec amaq:budget=4 --bwd-codec amaq:budget=6 --steps 200 && amaq report run\n"
      "(README: TLS and a token for a real network, --device cuda --dtype bf16 for a GPU server)\n",
      page);
  return 0;
}

}  // namespace

Run add_demo(CLI::App& app) {
  auto a = std::make_shared<DemoArgs>();
  app.add_option("--dir", a->dir, "where the model, data and the three runs go");
  app.add_option("--steps", a->steps, "optimizer steps per run");
  app.add_option("--batch", a->batch, "problems per step");
  app.add_option("--task", a->task, "reverse (a string of letters) or add (reversed-sum addition)")
      ->check(CLI::IsMember({"reverse", "add"}));
  app.add_option("--length", a->length, "reverse: letters per string");
  app.add_option("--digits", a->digits, "add: digits per operand");
  app.add_option("--train-examples", a->train_examples, "training problems");
  app.add_option("--val-examples", a->val_examples, "validation problems");
  app.add_option("--lr", a->lr, "peak learning rate");
  app.add_option("--seed", a->seed, "seed of model init, data and order");
  app.add_option("--amaq-fwd", a->amaq_fwd, "the AMAQ run's activation codec");
  app.add_option("--amaq-bwd", a->amaq_bwd, "the AMAQ run's gradient codec");
  app.add_flag("--quiet", a->quiet, "no progress output");
  app.add_option("--only", a->only, "run only these of amaq,bf16,fixed-4bit")->delimiter(',');
  return [a] { return run_demo(*a); };
}

}  // namespace amaq::app

// amaq: collaborative split fine-tuning with adaptive mixed-bit activation quantization.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <iostream>
#include <tuple>

#include "app/commands.h"
#include "core/error.h"
#include "core/runtime.h"

int main(int argc, char** argv) {
  amaq::exec_with_openmp_settings(argv);
  CLI::App app{"amaq: split fine-tuning of LLMs with compressed activations"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "torch intra-op threads (0 = one per core)")->check(CLI::Range(0, 1024));

  using Adder = amaq::app::Run (*)(CLI::App&);
  const std::vector<std::tuple<const char*, const char*, Adder>> table{
      {"demo", "train a small model from scratch, split, with AMAQ vs bf16 vs fixed 4-bit (no downloads)",
       amaq::app::add_demo},
      {"train", "split fine-tuning with both sides in this process (in-process or loopback TCP)", amaq::app::add_train},
      {"server", "serve the server side of split fine-tuning (layers [K, L)) to clients", amaq::app::add_server},
      {"client", "train the client side (data, embeddings, layers [0, K)) against a server", amaq::app::add_client},
      {"export", "write a run's client + server LoRA as one PEFT adapter, or the merged model", amaq::app::add_export},
      {"eval", "evaluate a model (+ adapter): perplexity, classification or generation accuracy", amaq::app::add_eval},
      {"tokenize", "text (JSON strings, one per line) to token ids, or back with --decode", amaq::app::add_tokenize},
      {"forward", "run a checkpoint (optionally split and with an adapter) on token ids", amaq::app::add_forward},
      {"init-model", "write a fresh Llama-style checkpoint for the byte tokenizer, to pretrain from scratch",
       amaq::app::add_init_model},
      {"make-task", "write a generated task (arithmetic word problems, addition, reversal) as JSONL",
       amaq::app::add_make_task},
      {"study", "run the AMAQ-against-fixed-precision study of a plan and write its report", amaq::app::add_study},
      {"emulate-link", "relay TCP through an emulated slow link (rate, round-trip time) for measurements",
       amaq::app::add_emulate_link},
      {"report", "a run's metrics as one self-contained HTML page; several runs overlaid", amaq::app::add_report},
      {"outliers", "outlier activation channels at every layer boundary: where a split is hardest to quantize",
       amaq::app::add_outliers},
      {"codec-curve", "codecs on a model's real split activations and gradients: bits per element against error",
       amaq::app::add_codec_curve},
      {"bench-train", "time full LoRA training steps of the unsplit model (JSON line), as the HF+PEFT peer does",
       amaq::app::add_bench_train},
  };
  std::vector<std::pair<CLI::App*, amaq::app::Run>> commands;
  for (const auto& [name, help, add] : table) {
    CLI::App* sub = app.add_subcommand(name, help);
    commands.emplace_back(sub, add(*sub));
  }

  CLI11_PARSE(app, argc, argv);
  // Logs go to stderr; stdout carries results (the port a server listens on, exported paths).
  spdlog::set_default_logger(spdlog::stderr_color_mt("amaq"));
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
  amaq::configure_threads(threads);
  amaq::configure_memory();
  try {
    for (auto& [sub, run] : commands) {
      if (sub->parsed()) return run();
    }
  } catch (const amaq::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return 1;
}

// amaq: collaborative split fine-tuning with adaptive mixed-bit activation quantization.
#include <CLI/CLI.hpp>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <iostream>

#include "app/commands.h"
#include "core/error.h"
#include "core/runtime.h"

int main(int argc, char** argv) {
  CLI::App app{"amaq: split fine-tuning of LLMs with compressed activations"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "torch intra-op threads (0 = one per core)");

  std::vector<std::pair<CLI::App*, amaq::app::Run>> commands;
  auto* forward = app.add_subcommand("forward", "run a checkpoint (optionally split and with an adapter) on token ids");
  commands.emplace_back(forward, amaq::app::add_forward(*forward));
  auto* server = app.add_subcommand("server", "serve the server side of split fine-tuning (layers [K, L)) to clients");
  commands.emplace_back(server, amaq::app::add_server(*server));
  auto* client = app.add_subcommand("client", "train the client side (data, embeddings, layers [0, K)) against a server");
  commands.emplace_back(client, amaq::app::add_client(*client));
  auto* train = app.add_subcommand("train", "split fine-tuning with both sides in this process (in-process or loopback TCP)");
  commands.emplace_back(train, amaq::app::add_train(*train));
  auto* exp = app.add_subcommand("export", "write a run's client + server LoRA as one PEFT adapter");
  commands.emplace_back(exp, amaq::app::add_export(*exp));
  auto* demo = app.add_subcommand("demo", "train a small model from scratch, split, with AMAQ vs bf16 vs fixed 4-bit (no downloads)");
  commands.emplace_back(demo, amaq::app::add_demo(*demo));
  auto* tokenize = app.add_subcommand("tokenize", "text (JSON strings, one per line) to token ids, or back with --decode");
  commands.emplace_back(tokenize, amaq::app::add_tokenize(*tokenize));
  auto* eval = app.add_subcommand("eval", "evaluate a model (+ adapter): perplexity, classification or generation accuracy");
  commands.emplace_back(eval, amaq::app::add_eval(*eval));

  CLI11_PARSE(app, argc, argv);
  // Logs go to stderr; stdout carries results (the port a server listens on, exported paths).
  spdlog::set_default_logger(spdlog::stderr_color_mt("amaq"));
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
  amaq::configure_threads(threads);
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

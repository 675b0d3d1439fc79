// amaq: collaborative split fine-tuning with adaptive mixed-bit activation quantization.
#include <CLI/CLI.hpp>

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

  CLI11_PARSE(app, argc, argv);
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

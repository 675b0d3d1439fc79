// Subcommands of the `amaq` executable. Each registers its flags on the parser and returns the
// function that runs it.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>

namespace amaq::app {

using Run = std::function<int()>;

Run add_forward(CLI::App& app);
Run add_server(CLI::App& app);
Run add_client(CLI::App& app);
Run add_train(CLI::App& app);
Run add_export(CLI::App& app);
Run add_demo(CLI::App& app);
Run add_tokenize(CLI::App& app);
Run add_eval(CLI::App& app);
Run add_init_model(CLI::App& app);
Run add_make_task(CLI::App& app);
Run add_study(CLI::App& app);
Run add_emulate_link(CLI::App& app);
Run add_bench_train(CLI::App& app);
Run add_report(CLI::App& app);
Run add_outliers(CLI::App& app);
Run add_codec_curve(CLI::App& app);

}  // namespace amaq::app

// `--config FILE.toml` for the long-running commands: toml++ reads the file and its values fill the
// options the command line left unset (a flag on the command line wins). Keys are the long flag
// names without dashes; tables nest with '-' (`[lora] r = 8` is `--lora-r 8`); '_' may stand for
// '-'. An unknown key or malformed file is an error naming it.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace amaq::app {

/// Adds `--config` to `app` (call after its other options). Options marked required may then come
/// from the file instead; the returned function applies the file and checks them, and is to be
/// called first when the command runs.
std::function<void()> use_toml_config(CLI::App& app);

/// A whole TOML file as JSON (tables become objects, arrays of tables arrays of objects). Malformed
/// TOML is an error naming the file, line and column.
nlohmann::json read_toml_json(const std::string& path);

/// (flag, value) for every option of `app` (given, from the config file, or default).
std::vector<std::pair<std::string, std::string>> resolved_options(const CLI::App& app);

}  // namespace amaq::app

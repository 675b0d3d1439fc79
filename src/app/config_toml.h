// `--config FILE.toml` for the training commands: toml++ reads the file, CLI11 applies it under the
// flags (a flag on the command line wins). Keys are the long flag names without dashes; tables
// nest with '-' (`[lora] r = 8` is `--lora-r 8`), '_' may stand for '-'. Unknown keys are errors.
#pragma once
#include <CLI/CLI.hpp>

#include <string>
#include <utility>
#include <vector>

namespace amaq::app {

class TomlConfig : public CLI::Config {
 public:
  std::string to_config(const CLI::App* app, bool default_also, bool write_description, std::string prefix) const override;
  std::vector<CLI::ConfigItem> from_config(std::istream& input) const override;
};

/// Makes `--config` read TOML on `app` and has every option remember its default for the table.
void use_toml_config(CLI::App& app);

/// (flag, value) for every option of `app` (given, from the config file, or default).
std::vector<std::pair<std::string, std::string>> resolved_options(const CLI::App& app);

}  // namespace amaq::app

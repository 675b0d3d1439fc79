// `amaq outliers`: at every layer boundary of a model, how far its largest activation channels stand
// above the median one (what a split there would send, and how hard it is to quantize). A table,
// then one JSON line.
#include <fmt/format.h>

#include "app/commands.h"
#include "recipes/outliers.h"
#include "tokenizer/tokenizer.h"
#include "train/metrics.h"

namespace amaq::app {

Run add_outliers(CLI::App& app) {
  struct Args {
    std::string model, data, tokenizer = "auto";
    int64_t seq_len = 128, rows = 64;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model", a->model, "HF model directory (config.json + safetensors)")->required();
  app.add_option("--data", a->data, "text to run through it (.txt, or .jsonl as amaq train reads)")->required();
  app.add_option("--tokenizer", a->tokenizer, "auto (the model's), byte, or a tokenizer file")->capture_default_str();
  app.add_option("--seq-len", a->seq_len, "tokens per sequence")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  app.add_option("--rows", a->rows, "sequences measured")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  return [a] {
    const auto tok = load_tokenizer(a->tokenizer == "auto" ? a->model : a->tokenizer);
    const auto bounds = recipes::boundary_outliers(a->model, a->data, *tok, a->seq_len, a->rows);
    const int64_t hardest = recipes::hardest_split(bounds);
    std::vector<std::vector<std::string>> table{{"split after layer", "max/median channel mean |h|",
                                                 "max/median channel max |h|", "first token / rest", "top channels"}};
    nlohmann::json lines = nlohmann::json::array();
    for (const auto& b : bounds) {
      table.push_back({fmt::format("{}{}", b.split, b.split == hardest ? " (hardest)" : ""),
                       fmt::format("{:.1f}", b.mean_ratio), fmt::format("{:.1f}", b.max_ratio),
                       fmt::format("{:.1f}", b.first_token_ratio), nlohmann::json(b.top).dump()});
      lines.push_back(b.to_json());
    }
    fmt::print("{}", train::format_table(table));
    fmt::print("{}\n", nlohmann::json{{"model", a->model}, {"boundaries", lines}, {"hardest_split", hardest}}.dump());
    return 0;
  };
}

}  // namespace amaq::app

// `amaq codec-curve`: codecs on a model's real split activations and gradients, bits per element
// against error (recipes/codec_curve.h). A table, then one JSON line.
#include <fmt/format.h>

#include <cmath>

#include "app/commands.h"
#include "recipes/codec_curve.h"
#include "tokenizer/tokenizer.h"
#include "train/metrics.h"

namespace amaq::app {

Run add_codec_curve(CLI::App& app) {
  struct Args {
    std::string model, data, tokenizer = "auto";
    int64_t split = 0, seq_len = 128, rows = 64;
    std::vector<std::string> codecs{"fixed:bits=4,group=128",
                                    "fixed:bits=4,gran=token",
                                    "fixed:bits=3,gran=token",
                                    "ecsq:bits=4",
                                    "ecsq:bits=3",
                                    "ecsq:bits=2"};
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model", a->model, "HF model directory (config.json + safetensors)")->required();
  app.add_option("--split", a->split, "the split: activations leave layer K - 1")->required();
  app.add_option("--data", a->data, "text to run through it (.txt, or .jsonl as amaq train reads)")->required();
  app.add_option("--tokenizer", a->tokenizer, "auto (the model's), byte, or a tokenizer file")->capture_default_str();
  app.add_option("--seq-len", a->seq_len, "tokens per sequence")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  app.add_option("--rows", a->rows, "sequences measured")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  app.add_option("--codec", a->codecs, "a codec to measure (repeat; none, fixed or ecsq specs)")->capture_default_str();
  return [a] {
    const auto tok = load_tokenizer(a->tokenizer == "auto" ? a->model : a->tokenizer);
    const recipes::SplitTensors t = recipes::split_tensors(a->model, a->data, *tok, a->seq_len, a->rows, a->split);
    const auto points = recipes::codec_points(t, a->codecs);
    std::vector<std::vector<std::string>> table{
        {"codec", "tensor", "bits/element", "NMSE", "Gaussian bound 0.5 log2(1/NMSE)", "bits - bound"}};
    nlohmann::json lines = nlohmann::json::array();
    for (const auto& p : points) {
      const double bound = p.nmse > 0 ? 0.5 * std::log2(1.0 / p.nmse) : INFINITY;
      table.push_back({p.codec, p.tensor, fmt::format("{:.3f}", p.bits), fmt::format("{:.3g}", p.nmse),
                       fmt::format("{:.3f}", bound), fmt::format("{:+.3f}", p.bits - bound)});
      lines.push_back(p.to_json());
    }
    fmt::print("{}", train::format_table(table));
    fmt::print(
        "{}\n",
        nlohmann::json{{"model", a->model}, {"split", a->split}, {"elements", t.activations.numel()}, {"points", lines}}
            .dump());
    return 0;
  };
}

}  // namespace amaq::app

// amaq eval: a base model (plus a PEFT adapter) on a dataset: perplexity, classification accuracy
// through verbalizer words, or generation accuracy with greedy decoding.
#include <fmt/format.h>

#include "app/commands.h"
#include "core/error.h"
#include "model/peft.h"
#include "train/eval.h"
#include "train/metrics.h"

namespace amaq::app {

Run add_eval(CLI::App& app) {
  struct Args {
    std::string model, adapter, data, tokenizer = "auto";
    int64_t seq_len = 512, batch = 8, max_new = 32;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model", a->model, "HF model directory")->required();
  app.add_option("--adapter", a->adapter, "PEFT LoRA adapter directory (e.g. from amaq export)");
  app.add_option("--data", a->data, ".txt / .jsonl (text | prompt+completion | text+label)")->required();
  app.add_option("--tokenizer", a->tokenizer, "auto (the model's), byte, or a tokenizer file");
  app.add_option("--seq-len", a->seq_len, "tokens per sequence")->check(CLI::Range(2, 1 << 20));
  app.add_option("--batch", a->batch, "sequences per forward pass")->check(CLI::Range(1, 4096));
  app.add_option("--max-new-tokens", a->max_new, "generation: longest answer")->check(CLI::Range(1, 1 << 16));
  return [a] {
    const ModelConfig config = ModelConfig::load(a->model);
    auto tok = load_tokenizer(a->tokenizer == "auto" ? a->model : a->tokenizer);
    if (tok->vocab_size() > config.vocab_size) {
      throw Error(
          "tokenizer has " + std::to_string(tok->vocab_size()) + " ids, the model " + std::to_string(config.vocab_size),
          "use the model's own tokenizer");
    }
    const CheckpointReader ckpt(a->model);
    check_config_matches_weights(config, ckpt);
    DecoderPart model = full_model(config);
    model->load_weights(ckpt);
    if (!a->adapter.empty()) load_peft_adapter(model, a->adapter);
    const train::Dataset data = train::Dataset::load(a->data, *tok, a->seq_len);
    const nlohmann::json m = train::evaluate_model(model, data, *tok, a->batch, a->max_new);
    std::vector<std::vector<std::string>> rows{{"metric", "value"}};
    for (const auto& [k, v] : m.items())
      rows.push_back({k, v.is_number_float() ? fmt::format("{:.6g}", v.get<double>()) : v.dump()});
    fmt::print(stderr, "{}", train::format_table(rows));
    fmt::print("{}\n", m.dump());
    return 0;
  };
}

}  // namespace amaq::app

#include "train/demo.h"

#include <nlohmann/json.hpp>

#include <random>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "tokenizer/tokenizer.h"

namespace amaq::train {

void write_preset_model(const std::string& dir, const PresetOptions& p, uint64_t seed) {
  nlohmann::json cfg{{"architectures", {"LlamaForCausalLM"}},
                     {"model_type", "llama"},
                     {"vocab_size", ByteTokenizer::kVocab},
                     {"hidden_size", p.hidden},
                     {"intermediate_size", p.intermediate},
                     {"num_hidden_layers", p.layers},
                     {"num_attention_heads", p.heads},
                     {"num_key_value_heads", p.kv_heads},
                     {"head_dim", p.hidden / p.heads},
                     {"max_position_embeddings", p.max_positions},
                     {"rms_norm_eps", 1e-6},
                     {"rope_theta", 10000.0},
                     {"hidden_act", "silu"},
                     {"tie_word_embeddings", false},
                     {"bos_token_id", ByteTokenizer::kBos},
                     {"eos_token_id", ByteTokenizer::kEos},
                     {"torch_dtype", "float32"}};
  const ModelConfig config = ModelConfig::from_json(cfg, "preset");
  DecoderPart model = full_model(config);
  at::NoGradGuard no_grad;
  at::manual_seed(seed);
  NamedTensors tensors;
  for (auto& [name, w] : model->base_weights()) {
    if (name.find("norm") != std::string::npos) w.fill_(1.0);
    else w.normal_(0.0, 0.02);
    tensors.emplace_back(name, w);
  }
  make_dirs(dir);
  save_safetensors(join_path(dir, "model.safetensors"), tensors, {{"format", "pt"}});
  write_file_atomic(join_path(dir, "config.json"), cfg.dump(2) + "\n");
}

void write_addition_task(const std::string& dir, int digits, int64_t n_train, int64_t n_val, uint64_t seed) {
  if (digits < 1 || digits > 9) throw Error("addition with " + std::to_string(digits) + " digits", "use 1..9 digits");
  int64_t limit = 1;
  for (int i = 0; i < digits; ++i) limit *= 10;
  if (n_train + n_val > limit * limit / 2) throw Error("not enough distinct problems for the requested sizes", "use more digits");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> operand(0, limit - 1);
  std::set<std::pair<int64_t, int64_t>> seen;
  auto pad = [](int64_t v, int width) {
    std::string t = std::to_string(v);
    return std::string(static_cast<size_t>(std::max<int>(0, width - static_cast<int>(t.size()))), '0') + t;
  };
  auto write = [&](const std::string& name, int64_t n) {
    std::string out;
    while (n > 0) {
      const int64_t a = operand(rng), b = operand(rng);
      if (!seen.insert({a, b}).second) continue;
      const std::string sum = pad(a + b, digits + 1);
      out += nlohmann::json{{"prompt", pad(a, digits) + "+" + pad(b, digits) + "="}, {"completion", std::string(sum.rbegin(), sum.rend())}}.dump() + "\n";
      --n;
    }
    write_file_atomic(join_path(dir, name), out);
  };
  make_dirs(dir);
  write("val.jsonl", n_val);
  write("train.jsonl", n_train);
}

void write_reversal_task(const std::string& dir, int length, int64_t n_train, int64_t n_val, uint64_t seed) {
  if (length < 2 || length > 32) throw Error("reversal of length " + std::to_string(length), "use 2..32 letters");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> letter(0, 9);
  std::set<std::string> seen;
  auto write = [&](const std::string& name, int64_t n) {
    std::string out;
    while (n > 0) {
      std::string s;
      for (int i = 0; i < length; ++i) s.push_back(static_cast<char>('a' + letter(rng)));
      if (!seen.insert(s).second) continue;
      out += nlohmann::json{{"prompt", s + "="}, {"completion", std::string(s.rbegin(), s.rend())}}.dump() + "\n";
      --n;
    }
    write_file_atomic(join_path(dir, name), out);
  };
  make_dirs(dir);
  write("val.jsonl", n_val);
  write("train.jsonl", n_train);
}

}  // namespace amaq::train

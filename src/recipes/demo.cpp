#include "recipes/demo.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "tokenizer/tokenizer.h"

namespace amaq::recipes {

void write_preset_model(const std::string& dir, const PresetOptions& p, uint64_t seed) {
  nlohmann::json cfg{{"architectures", {"LlamaForCausalLM"}},
                     {"model_type", "llama"},
                     {"vocab_size", p.vocab > 0 ? p.vocab : ByteTokenizer::kVocab},
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
                     {"torch_dtype", p.dtype == "bf16" ? "bfloat16" : "float32"}};
  const ModelConfig config = ModelConfig::from_json(cfg, "preset");
  DecoderPart model = full_model(config, parse_dtype(p.dtype));
  at::NoGradGuard no_grad;
  at::manual_seed(seed);
  NamedTensors tensors;
  for (auto& [name, w] : model->base_weights()) {
    if (name.find("norm") != std::string::npos)
      w.fill_(1.0);
    else
      w.normal_(0.0, 0.02);
    tensors.emplace_back(name, w);
  }
  make_dirs(dir);
  save_safetensors(join_path(dir, "model.safetensors"), tensors, {{"format", "pt"}});
  write_file_atomic(join_path(dir, "config.json"), cfg.dump(2) + "\n");
}

namespace {

// Writes DIR/val.jsonl, then DIR/train.jsonl: n_val and n_train problems drawn by `draw` (a prompt and
// its completion), every prompt distinct across both files.
template <typename Draw>
void write_task_files(const std::string& dir, int64_t n_train, int64_t n_val, Draw draw) {
  std::set<std::string> seen;
  auto write = [&](const std::string& name, int64_t n) {
    std::string out;
    while (n > 0) {
      auto [prompt, completion] = draw();
      if (!seen.insert(prompt).second) continue;
      out += nlohmann::json{{"prompt", prompt}, {"completion", completion}}.dump() + "\n";
      --n;
    }
    write_file_atomic(join_path(dir, name), out);
  };
  make_dirs(dir);
  write("val.jsonl", n_val);
  write("train.jsonl", n_train);
}

}  // namespace

void write_addition_task(const std::string& dir, int digits, int64_t n_train, int64_t n_val, uint64_t seed) {
  if (digits < 1 || digits > 9) throw Error("addition with " + std::to_string(digits) + " digits", "use 1..9 digits");
  int64_t limit = 1;
  for (int i = 0; i < digits; ++i) limit *= 10;
  if (n_train + n_val > limit * limit / 2)
    throw Error("not enough distinct problems for the requested sizes", "use more digits");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> operand(0, limit - 1);
  auto pad = [](int64_t v, int width) {
    std::string t = std::to_string(v);
    return std::string(static_cast<size_t>(std::max<int>(0, width - static_cast<int>(t.size()))), '0') + t;
  };
  write_task_files(dir, n_train, n_val, [&] {
    const int64_t a = operand(rng), b = operand(rng);
    const std::string sum = pad(a + b, digits + 1);
    return std::pair{pad(a, digits) + "+" + pad(b, digits) + "=", std::string(sum.rbegin(), sum.rend())};
  });
}

void write_reversal_task(const std::string& dir, int length, int64_t n_train, int64_t n_val, uint64_t seed) {
  if (length < 2 || length > 32) throw Error("reversal of length " + std::to_string(length), "use 2..32 letters");
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> letter(0, 9);
  write_task_files(dir, n_train, n_val, [&] {
    std::string s;
    for (int i = 0; i < length; ++i) s.push_back(static_cast<char>('a' + letter(rng)));
    return std::pair{s + "=", std::string(s.rbegin(), s.rend())};
  });
}

void write_word_problem_task(const std::string& dir, int64_t n_train, int64_t n_val, uint64_t seed) {
  static const char* kNames[] = {"Ann", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gia", "Hugo", "Ida", "Jon"};
  static const char* kThings[] = {"apples", "books", "coins", "marbles", "pens", "stamps", "cards", "shells"};
  std::mt19937_64 rng(seed);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  write_task_files(dir, n_train, n_val, [&] {
    const std::string name = kNames[pick(0, 9)], thing = kThings[pick(0, 7)];
    const int kind = static_cast<int>(pick(0, 3));
    std::string q;
    int64_t answer = 0;
    if (kind == 0) {
      const int64_t a = pick(2, 99), b = pick(2, 99);
      q = fmt::format("{} has {} {} and buys {} more. How many {} does {} have now?", name, a, thing, b, thing, name);
      answer = a + b;
    } else if (kind == 1) {
      const int64_t a = pick(10, 99), b = pick(1, a - 1);
      q = fmt::format("{} had {} {} and gave {} away. How many {} are left?", name, a, thing, b, thing);
      answer = a - b;
    } else if (kind == 2) {
      const int64_t a = pick(2, 12), b = pick(2, 12);
      q = fmt::format("{} buys {} boxes of {} with {} in each box. How many {} is that?", name, a, thing, b, thing);
      answer = a * b;
    } else {
      const int64_t a = pick(2, 60), b = pick(2, 60), c = pick(1, a + b - 1);
      q = fmt::format("{} has {} {}, buys {} more and then gives away {}. How many {} does {} have?", name, a, thing, b,
                      c, thing, name);
      answer = a + b - c;
    }
    return std::pair{"Q: " + q + "\nA: ", std::to_string(answer)};
  });
}

}  // namespace amaq::recipes

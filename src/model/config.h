// HuggingFace `config.json` for the decoder families amaq runs: Llama, Qwen2, Mistral.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace amaq {

enum class Arch { kLlama, kQwen2, kMistral };

/// Rotary embedding parameters (`rope_parameters` in transformers 5, `rope_theta`+`rope_scaling` before).
struct RopeConfig {
  std::string type = "default";  ///< default | linear | llama3
  double theta = 10000.0;
  double factor = 1.0;                           ///< linear, llama3
  double low_freq_factor = 1.0;                  ///< llama3
  double high_freq_factor = 4.0;                 ///< llama3
  int64_t original_max_position_embeddings = 0;  ///< llama3
};

struct ModelConfig {
  Arch arch = Arch::kLlama;
  std::string architecture;  ///< e.g. "LlamaForCausalLM"
  std::string model_type;    ///< e.g. "llama"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool qkv_bias = false;  ///< q/k/v projections have a bias (Qwen2, Llama attention_bias)
  bool o_bias = false;    ///< o_proj has a bias (Llama attention_bias)
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  /// Per layer: attention limited to the last `sliding_window` keys (0 = full attention).
  std::vector<int64_t> layer_window;

  /// Parses and validates; `where` names the source in errors.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& where);
  /// Reads `DIR/config.json`.
  static ModelConfig load(const std::string& dir);
  /// An HF-compatible config.json for this model.
  nlohmann::json to_json() const;
  /// Bytes of all weights at the given element size.
  int64_t num_parameters() const;
};

}  // namespace amaq

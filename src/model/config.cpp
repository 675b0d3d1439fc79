#include "model/config.h"

#include "core/error.h"
#include "core/fs.h"

namespace amaq {
namespace {

const char* kHintConfig = "use the config.json that came with the checkpoint";

struct Reader {
  const nlohmann::json& j;
  const std::string& where;

  [[noreturn]] void fail(const std::string& field, const std::string& what,
                         const std::string& hint = kHintConfig) const {
    throw Error(where + ": field '" + field + "' " + what, hint);
  }
  bool has(const char* k) const { return j.contains(k) && !j[k].is_null(); }
  int64_t positive_int(const char* k) const {
    if (!has(k)) fail(k, "is missing");
    if (!j[k].is_number_integer() || j[k].get<int64_t>() <= 0)
      fail(k, "must be a positive integer, got " + j[k].dump());
    return j[k].get<int64_t>();
  }
  int64_t positive_int_or(const char* k, int64_t def) const { return has(k) ? positive_int(k) : def; }
  // A positive integer no larger than `max`: sizes are checked before anything is allocated.
  int64_t bounded_int(const char* k, int64_t max) const {
    const int64_t v = positive_int(k);
    if (v > max) fail(k, "is " + std::to_string(v) + ", more than the " + std::to_string(max) + " amaq accepts");
    return v;
  }
  int64_t bounded_int_or(const char* k, int64_t def, int64_t max) const { return has(k) ? bounded_int(k, max) : def; }
  double number_or(const char* k, double def) const {
    if (!has(k)) return def;
    if (!j[k].is_number()) fail(k, "must be a number, got " + j[k].dump());
    return j[k].get<double>();
  }
  bool bool_or(const char* k, bool def) const {
    if (!has(k)) return def;
    if (!j[k].is_boolean()) fail(k, "must be true or false, got " + j[k].dump());
    return j[k].get<bool>();
  }
  std::string string_or(const char* k, const std::string& def) const {
    if (!has(k)) return def;
    if (!j[k].is_string()) fail(k, "must be a string, got " + j[k].dump());
    return j[k].get<std::string>();
  }
};

RopeConfig parse_rope(const nlohmann::json& j, const std::string& where) {
  RopeConfig rope;
  Reader top{j, where};
  // transformers >= 5 writes rope_parameters; older files write rope_theta and rope_scaling.
  const char* field =
      j.contains("rope_parameters") && !j["rope_parameters"].is_null() ? "rope_parameters" : "rope_scaling";
  rope.theta = top.number_or("rope_theta", 10000.0);
  if (!top.has(field)) return rope;
  const auto& r = j[field];
  if (!r.is_object()) top.fail(field, "must be an object, got " + r.dump());
  Reader rr{r, where};
  if (r.contains("rope_theta")) rope.theta = rr.number_or("rope_theta", rope.theta);
  std::string type = rr.string_or("rope_type", rr.string_or("type", "default"));
  rope.type = type;
  if (type == "default") return rope;
  if (type == "linear") {
    rope.factor = rr.number_or("factor", 1.0);
    return rope;
  }
  if (type == "llama3") {
    rope.factor = rr.number_or("factor", 8.0);
    rope.low_freq_factor = rr.number_or("low_freq_factor", 1.0);
    rope.high_freq_factor = rr.number_or("high_freq_factor", 4.0);
    if (!rr.has("original_max_position_embeddings"))
      top.fail(std::string(field) + ".original_max_position_embeddings", "is missing");
    rope.original_max_position_embeddings = rr.positive_int("original_max_position_embeddings");
    if (rope.high_freq_factor <= rope.low_freq_factor) top.fail(field, "needs high_freq_factor > low_freq_factor");
    return rope;
  }
  top.fail(
      std::string(field) + ".rope_type", "is '" + type + "', which amaq does not implement",
      "supported rope types are default, linear and llama3; a model with another scaling would compute wrong outputs");
}

}  // namespace

ModelConfig ModelConfig::from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_object()) throw Error(where + " is not a JSON object", kHintConfig);
  Reader r{j, where};
  ModelConfig c;

  c.model_type = r.string_or("model_type", "");
  if (r.has("architectures")) {
    if (!j["architectures"].is_array() || j["architectures"].size() != 1 || !j["architectures"][0].is_string()) {
      r.fail("architectures", "must list exactly one architecture, got " + j["architectures"].dump());
    }
    c.architecture = j["architectures"][0].get<std::string>();
  } else if (c.model_type == "llama") {
    c.architecture = "LlamaForCausalLM";
  } else if (c.model_type == "qwen2") {
    c.architecture = "Qwen2ForCausalLM";
  } else if (c.model_type == "mistral") {
    c.architecture = "MistralForCausalLM";
  }
  if (c.architecture == "LlamaForCausalLM") {
    c.arch = Arch::kLlama;
  } else if (c.architecture == "Qwen2ForCausalLM") {
    c.arch = Arch::kQwen2;
  } else if (c.architecture == "MistralForCausalLM") {
    c.arch = Arch::kMistral;
  } else {
    r.fail("architectures",
           "is '" + (c.architecture.empty() ? c.model_type : c.architecture) + "', which amaq does not support",
           "amaq runs LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM checkpoints");
  }

  // Bounds well above any released Llama/Qwen2/Mistral (vocabularies to 256K, hidden 16K, 126 layers).
  c.vocab_size = r.bounded_int("vocab_size", int64_t{1} << 22);
  c.hidden_size = r.bounded_int("hidden_size", 1 << 16);
  c.intermediate_size = r.bounded_int("intermediate_size", 1 << 18);
  c.num_layers = r.bounded_int("num_hidden_layers", 1024);
  c.num_heads = r.bounded_int("num_attention_heads", 1024);
  c.num_kv_heads = r.bounded_int_or("num_key_value_heads", c.num_heads, 1024);
  c.head_dim = r.bounded_int_or("head_dim", std::max<int64_t>(1, c.hidden_size / c.num_heads), 1024);
  c.max_position_embeddings = r.bounded_int_or("max_position_embeddings", 4096, int64_t{1} << 24);
  c.rms_norm_eps = r.number_or("rms_norm_eps", 1e-6);
  if (c.num_heads % c.num_kv_heads != 0) {
    r.fail("num_key_value_heads", "(" + std::to_string(c.num_kv_heads) + ") must divide num_attention_heads (" +
                                      std::to_string(c.num_heads) + ")");
  }
  if (c.head_dim % 2 != 0) r.fail("head_dim", "must be even for rotary embeddings");

  std::string act = r.string_or("hidden_act", "silu");
  if (act != "silu")
    r.fail("hidden_act", "is '" + act + "'; amaq implements the SwiGLU MLP with silu only",
           "this checkpoint is not a Llama/Qwen2/Mistral-style model");
  if (r.number_or("partial_rotary_factor", 1.0) != 1.0)
    r.fail("partial_rotary_factor", "other than 1.0 is not supported",
           "amaq rotates the whole head dimension, as Llama, Qwen2 and Mistral do");
  if (r.has("quantization_config")) {
    r.fail("quantization_config", "is set: quantized checkpoints are not supported",
           "use an unquantized (fp32/bf16/fp16) checkpoint; amaq quantizes only what crosses the network");
  }
  c.rope = parse_rope(j, where);

  switch (c.arch) {
    case Arch::kLlama:
      c.qkv_bias = c.o_bias = r.bool_or("attention_bias", false);
      c.mlp_bias = r.bool_or("mlp_bias", false);
      break;
    case Arch::kQwen2:
      c.qkv_bias = true;
      break;
    case Arch::kMistral:
      break;
  }
  c.tie_word_embeddings = r.bool_or("tie_word_embeddings", false);

  // Sliding-window attention: Mistral on every layer; Qwen2 only with use_sliding_window, and then
  // from layer max_window_layers on (or as `layer_types` says).
  c.layer_window.assign(c.num_layers, 0);
  int64_t window = r.has("sliding_window") ? r.positive_int("sliding_window") : 0;
  if (c.arch == Arch::kMistral && window > 0) {
    c.layer_window.assign(c.num_layers, window);
  } else if (c.arch == Arch::kQwen2 && r.bool_or("use_sliding_window", false) && window > 0) {
    if (r.has("layer_types")) {
      const auto& lt = j["layer_types"];
      if (!lt.is_array() || static_cast<int64_t>(lt.size()) != c.num_layers) {
        r.fail("layer_types", "must list one type per layer");
      }
      for (int64_t i = 0; i < c.num_layers; ++i) {
        std::string t = lt[i].is_string() ? lt[i].get<std::string>() : "";
        if (t == "sliding_attention") {
          c.layer_window[i] = window;
        } else if (t != "full_attention") {
          r.fail("layer_types", "has unknown type " + lt[i].dump());
        }
      }
    } else {
      int64_t from = r.positive_int_or("max_window_layers", c.num_layers);
      for (int64_t i = from; i < c.num_layers; ++i) c.layer_window[i] = window;
    }
  }
  return c;
}

ModelConfig ModelConfig::load(const std::string& dir) {
  std::string path = join_path(dir, "config.json");
  if (!file_exists(path)) {
    throw Error("no config.json in " + dir,
                "point --model at a HuggingFace model directory (config.json + *.safetensors)");
  }
  auto j = nlohmann::json::parse(read_file(path), nullptr, false);
  if (j.is_discarded()) throw Error(path + " is not valid JSON", kHintConfig);
  return from_json(j, path);
}

nlohmann::json ModelConfig::to_json() const {
  nlohmann::json j;
  j["architectures"] = {architecture};
  j["model_type"] = model_type.empty() ? (arch == Arch::kLlama   ? "llama"
                                          : arch == Arch::kQwen2 ? "qwen2"
                                                                 : "mistral")
                                       : model_type;
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_layers;
  j["num_attention_heads"] = num_heads;
  j["num_key_value_heads"] = num_kv_heads;
  j["head_dim"] = head_dim;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["rope_theta"] = rope.theta;
  if (rope.type != "default") {
    nlohmann::json s = {{"rope_type", rope.type}, {"factor", rope.factor}};
    if (rope.type == "llama3") {
      s["low_freq_factor"] = rope.low_freq_factor;
      s["high_freq_factor"] = rope.high_freq_factor;
      s["original_max_position_embeddings"] = rope.original_max_position_embeddings;
    }
    j["rope_scaling"] = s;
  }
  if (arch == Arch::kLlama) {
    j["attention_bias"] = qkv_bias;
    j["mlp_bias"] = mlp_bias;
  }
  j["torch_dtype"] = "float32";
  return j;
}

int64_t ModelConfig::num_parameters() const {
  int64_t q = num_heads * head_dim, kv = num_kv_heads * head_dim;
  int64_t attn = hidden_size * q + 2 * hidden_size * kv + q * hidden_size + (qkv_bias ? q + 2 * kv : 0) +
                 (o_bias ? hidden_size : 0);
  int64_t mlp = 3 * hidden_size * intermediate_size + (mlp_bias ? 2 * intermediate_size + hidden_size : 0);
  int64_t layer = attn + mlp + 2 * hidden_size;
  int64_t embed = vocab_size * hidden_size;
  return embed + num_layers * layer + hidden_size + (tie_word_embeddings ? 0 : embed);
}

}  // namespace amaq

// PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors`, keys such as
// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
#pragma once
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/layers.h"
#include "model/part.h"

namespace amaq {

struct AdapterConfig {
  int64_t r = 8;
  double lora_alpha = 16.0;
  double lora_dropout = 0.0;
  bool use_rslora = false;
  std::vector<std::string> target_modules;
  std::string base_model_name_or_path;
  /// PEFT's per-module rank and alpha where they differ from r / lora_alpha. Keys are module names,
  /// matched like target_modules (the whole name or a dotted suffix); regular expressions are refused.
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;

  LoRAOptions lora_options() const { return LoRAOptions(r).alpha(lora_alpha).dropout(lora_dropout).rslora(use_rslora); }
  /// The options of one module, with rank_pattern / alpha_pattern applied.
  LoRAOptions lora_options_for(const std::string& module_name) const;
  /// Reads DIR/adapter_config.json and refuses PEFT features amaq does not implement.
  static AdapterConfig load(const std::string& dir);
  /// PEFT's LoraConfig fields, loadable by `PeftModel.from_pretrained`.
  nlohmann::json to_json() const;
};

/// PEFT's tensor key for an HF module name and "lora_A" / "lora_B".
std::string peft_key(const std::string& module_name, const std::string& which);

/// Attaches the adapter's LoRA to every targeted linear of `part` and loads its tensors for the
/// layers the part holds. Every targeted layer of the part must have its tensors in the file.
AdapterConfig load_peft_adapter(DecoderPart& part, const std::string& dir);

/// Writes the LoRA tensors of all `parts` (a client and a server part, or one full model) as one
/// PEFT adapter, atomically, creating `dir` if needed.
void save_peft_adapter(const std::vector<DecoderPart>& parts, const AdapterConfig& config, const std::string& dir);

}  // namespace amaq

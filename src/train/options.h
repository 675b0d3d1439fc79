// What a run is configured with, per side, as plain structs. The app layer fills them from flags
// and TOML; SCHEDULE messages carry `Schedule` and the server's view of it as JSON.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/layers.h"

namespace amaq::train {

/// What one side trains.
struct SideOptions {
  bool full = false;  ///< full fine-tuning of this side's weights instead of LoRA
  int64_t lora_r = 8;
  double lora_alpha = 16.0;
  double lora_dropout = 0.0;
  bool rslora = false;
  std::vector<std::string> targets{"all-linear"};
  std::string init_adapter;  ///< start from this PEFT adapter (its LoRA for this side's layers)

  LoRAOptions lora() const { return LoRAOptions(lora_r).alpha(lora_alpha).dropout(lora_dropout).rslora(rslora); }
  nlohmann::json to_json() const;
  static SideOptions from_json(const nlohmann::json& j);
};

/// The optimisation schedule; the client owns it and sends it to the server.
struct Schedule {
  int64_t steps = 100;        ///< optimizer steps
  int64_t micro_batches = 1;  ///< gradient accumulation: micro-batches per optimizer step
  double lr = 2e-4;
  int64_t warmup = 0;         ///< linear warm-up steps
  double min_lr_ratio = 0.1;  ///< cosine decays to lr * min_lr_ratio at the last step
  double weight_decay = 0.0;
  double clip = 1.0;      ///< global gradient-norm clip over both sides (0 = off)
  double gate_lr = 0.05;  ///< AMAQ gates' own AdamW group
  uint64_t seed = 0;

  /// Learning rate of optimizer step `step` (0-based): linear warm-up to lr, then cosine.
  double lr_at(int64_t step) const;
  nlohmann::json to_json() const;
  /// Validates ranges; throws amaq::Error naming the field.
  static Schedule from_json(const nlohmann::json& j);
};

}  // namespace amaq::train

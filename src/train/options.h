// What a run is configured with, per side, as plain structs. The app layer fills them from flags
// and TOML; SCHEDULE messages carry `Schedule` and the server's view of it as JSON. Also the
// parsers of the JSON a peer or a run directory hands us (SCHEDULE bodies, run.json, a checkpoint's
// state.json): no libtorch here, so the fuzzer (tests/fuzz) runs them too.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

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
  // Where and in what precision this side computes: its own choice, never sent to the peer (packets
  // do not depend on it) and not in to_json(). Checked by core/device.h when the side is built.
  std::string device = "cpu";             ///< cpu, cuda, cuda:N
  std::string dtype = "fp32";             ///< fp32 or bf16 (the base weights' and activations' dtype)
  bool activation_checkpointing = false;  ///< recompute each layer in backward (memory for time)
  bool cuda_graph = false;                ///< the server's micro-batch captured as a CUDA graph and replayed (side.h)

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

/// Run ids name directories: 8-64 lowercase hex characters.
bool valid_run_id(const std::string& id);
/// Federation names: 1-64 characters of [A-Za-z0-9._-].
bool valid_federation_name(const std::string& name);

/// The client's SCHEDULE: which run, from which step, with what shapes and schedule.
struct ScheduleRequest {
  std::string run_id;
  int64_t resume_step = -1;  ///< -1: a fresh run
  int64_t batch = 0, seq_len = 0;
  Schedule schedule;
  std::string federation;   ///< SplitFed: the federation this run joins (train/federation.h); "" for none
  int64_t fed_clients = 1;  ///< members the federation waits for before its first step

  nlohmann::json to_json() const;
  /// Every field checked, batch x seq_len without overflow; throws amaq::Error naming the field.
  static ScheduleRequest from_json(const nlohmann::json& j);
};

/// The run id in a run directory's run.json; throws amaq::Error naming `path` when it is damaged.
std::string parse_run_file(const std::string& text, const std::string& path);
/// A checkpoint's state.json: a JSON object with an integer "step"; throws amaq::Error naming `path`.
nlohmann::json parse_state_file(const std::string& text, const std::string& path);

}  // namespace amaq::train

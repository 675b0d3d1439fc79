#include "train/options.h"

#include <cmath>

#include "core/error.h"

namespace amaq::train {

nlohmann::json SideOptions::to_json() const {
  return {{"full", full},     {"lora_r", lora_r},  {"lora_alpha", lora_alpha}, {"lora_dropout", lora_dropout},
          {"rslora", rslora}, {"targets", targets}};
}

SideOptions SideOptions::from_json(const nlohmann::json& j) {
  SideOptions s;
  try {
    s.full = j.at("full").get<bool>();
    s.lora_r = j.at("lora_r").get<int64_t>();
    s.lora_alpha = j.at("lora_alpha").get<double>();
    s.lora_dropout = j.at("lora_dropout").get<double>();
    s.rslora = j.at("rslora").get<bool>();
    s.targets = j.at("targets").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("side options: ") + e.what(), "both sides must run the same amaq version");
  }
  return s;
}

double Schedule::lr_at(int64_t step) const {
  if (warmup > 0 && step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const int64_t span = std::max<int64_t>(1, steps - warmup - 1);
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(span));
  const double min_lr = lr * min_lr_ratio;
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

nlohmann::json Schedule::to_json() const {
  return {{"steps", steps},
          {"micro_batches", micro_batches},
          {"lr", lr},
          {"warmup", warmup},
          {"min_lr_ratio", min_lr_ratio},
          {"weight_decay", weight_decay},
          {"clip", clip},
          {"gate_lr", gate_lr},
          {"seed", seed}};
}

Schedule Schedule::from_json(const nlohmann::json& j) {
  Schedule s;
  try {
    s.steps = j.at("steps").get<int64_t>();
    s.micro_batches = j.at("micro_batches").get<int64_t>();
    s.lr = j.at("lr").get<double>();
    s.warmup = j.at("warmup").get<int64_t>();
    s.min_lr_ratio = j.at("min_lr_ratio").get<double>();
    s.weight_decay = j.at("weight_decay").get<double>();
    s.clip = j.at("clip").get<double>();
    s.gate_lr = j.at("gate_lr").get<double>();
    s.seed = j.at("seed").get<uint64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("schedule: ") + e.what(), "both sides must run the same amaq version");
  }
  auto check = [](bool ok, const char* field, const char* hint) {
    if (!ok) throw Error(std::string("schedule: ") + field + " out of range", hint);
  };
  check(s.steps >= 1, "steps", "--steps must be at least 1");
  check(s.micro_batches >= 1, "micro_batches", "--micro-batches must be at least 1");
  check(std::isfinite(s.lr) && s.lr > 0, "lr", "--lr must be a positive number");
  check(s.warmup >= 0 && s.warmup <= s.steps, "warmup", "--warmup must be in [0, steps]");
  check(s.min_lr_ratio >= 0 && s.min_lr_ratio <= 1, "min_lr_ratio", "--min-lr-ratio must be in [0, 1]");
  check(s.weight_decay >= 0 && std::isfinite(s.weight_decay), "weight_decay", "--weight-decay must be >= 0");
  check(s.clip >= 0 && std::isfinite(s.clip), "clip", "--clip must be >= 0 (0 = off)");
  check(s.gate_lr >= 0 && std::isfinite(s.gate_lr), "gate_lr", "--gate-lr must be >= 0");
  return s;
}

}  // namespace amaq::train

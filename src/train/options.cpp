#include "train/options.h"

#include <cmath>

#include "core/error.h"
#include "core/json.h"

namespace amaq::train {

nlohmann::json SideOptions::to_json() const {
  return {{"full", full},     {"lora_r", lora_r},  {"lora_alpha", lora_alpha}, {"lora_dropout", lora_dropout},
          {"rslora", rslora}, {"targets", targets}};
}

SideOptions SideOptions::from_json(const nlohmann::json& j) {
  SideOptions s;
  try {
    s.full = j.at("full").get<bool>();
    s.lora_r = json_int<int64_t>(j, "lora_r");
    s.lora_alpha = j.at("lora_alpha").get<double>();
    s.lora_dropout = j.at("lora_dropout").get<double>();
    s.rslora = j.at("rslora").get<bool>();
    s.targets = j.at("targets").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("side options: ") + e.what(), "both sides must run the same amaq version");
  }
  if (s.lora_r < 1 || s.lora_r > 65536 || !std::isfinite(s.lora_alpha) || s.lora_alpha <= 0 ||
      !(s.lora_dropout >= 0 && s.lora_dropout < 1)) {
    throw Error("side options: lora_r, lora_alpha or lora_dropout out of range",
                "a damaged side.json, or a peer of another amaq version");
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
    s.steps = json_int<int64_t>(j, "steps");
    s.micro_batches = json_int<int64_t>(j, "micro_batches");
    s.lr = j.at("lr").get<double>();
    s.warmup = json_int<int64_t>(j, "warmup");
    s.min_lr_ratio = j.at("min_lr_ratio").get<double>();
    s.weight_decay = j.at("weight_decay").get<double>();
    s.clip = j.at("clip").get<double>();
    s.gate_lr = j.at("gate_lr").get<double>();
    s.seed = json_int<uint64_t>(j, "seed");
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

bool valid_run_id(const std::string& id) {
  return id.size() >= 8 && id.size() <= 64 && id.find_first_not_of("0123456789abcdef") == std::string::npos;
}

nlohmann::json ScheduleRequest::to_json() const {
  nlohmann::json j{{"run_id", run_id},
                   {"resume_step", resume_step},
                   {"schedule", schedule.to_json()},
                   {"batch", batch},
                   {"seq_len", seq_len}};
  if (!federation.empty()) j["federation"] = {{"name", federation}, {"clients", fed_clients}};
  return j;
}

ScheduleRequest ScheduleRequest::from_json(const nlohmann::json& j) {
  ScheduleRequest r;
  try {
    r.run_id = j.at("run_id").get<std::string>();
    r.resume_step = json_int<int64_t>(j, "resume_step");
    r.batch = json_int<int64_t>(j, "batch");
    r.seq_len = json_int<int64_t>(j, "seq_len");
    r.schedule = Schedule::from_json(j.at("schedule"));
    if (j.contains("federation")) {
      r.federation = j.at("federation").at("name").get<std::string>();
      r.fed_clients = json_int<int64_t>(j.at("federation"), "clients");
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("SCHEDULE: ") + e.what(), "both sides must run the same amaq version");
  }
  if (j.contains("federation") && !valid_federation_name(r.federation))
    throw Error("SCHEDULE: federation name must be 1-64 characters of A-Z a-z 0-9 . _ -", "rename --federation");
  if (r.fed_clients < 1 || r.fed_clients > 1024)
    throw Error("SCHEDULE: federation clients outside [1, 1024]", "set --fed-clients to the number of members");
  if (!valid_run_id(r.run_id))
    throw Error("SCHEDULE: run_id must be 8-64 lowercase hex characters", "a damaged run.json on the client?");
  if (r.resume_step < -1 || r.resume_step > r.schedule.steps)
    throw Error("SCHEDULE: resume_step outside [-1, steps]", "resume from a checkpoint of this run");
  if (r.batch < 1 || r.seq_len < 2 || r.batch > 65536 || r.seq_len > 65536 ||
      r.batch * r.seq_len > 65536)  // no overflow
    throw Error("SCHEDULE: batch x seq_len must be in [2, 65536] tokens per micro-batch", "lower --batch or --seq-len");
  return r;
}

bool valid_federation_name(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char ch : name) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
                    ch == '_' || ch == '-';
    if (!ok) return false;
  }
  return true;
}

std::string parse_run_file(const std::string& text, const std::string& path) {
  const nlohmann::json run = nlohmann::json::parse(text, nullptr, false);
  if (run.is_discarded() || !run.is_object() || !run.contains("run_id") || !run["run_id"].is_string() ||
      !valid_run_id(run["run_id"].get<std::string>())) {
    throw Error(path + " is damaged (no valid \"run_id\")", "start a new run in another --run-dir");
  }
  return run["run_id"].get<std::string>();
}

nlohmann::json parse_state_file(const std::string& text, const std::string& path) {
  nlohmann::json fields = nlohmann::json::parse(text, nullptr, false);
  if (fields.is_discarded() || !fields.is_object() || !fields.contains("step") || !fields["step"].is_number_integer() ||
      fields["step"].get<int64_t>() < 0) {
    throw Error(path + " is damaged (not a JSON object with a non-negative integer \"step\")",
                "resume from an earlier checkpoint (--resume skips damaged ones)");
  }
  return fields;
}

}  // namespace amaq::train

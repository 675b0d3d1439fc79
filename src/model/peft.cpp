#include "model/peft.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"

namespace amaq {
namespace {

const char* kPeftPrefix = "base_model.model.";

void refuse_if(bool cond, const std::string& path, const std::string& field, const std::string& why) {
  if (cond) {
    throw Error(path + ": " + field + " " + why + ", which amaq does not implement",
                "train or export the adapter as plain LoRA (no DoRA, no modules_to_save, no layers_to_transform)");
  }
}

}  // namespace

std::string peft_key(const std::string& module_name, const std::string& which) {
  return kPeftPrefix + module_name + "." + which + ".weight";
}

AdapterConfig AdapterConfig::load(const std::string& dir) {
  std::string path = join_path(dir, "adapter_config.json");
  if (!file_exists(path))
    throw Error("no adapter_config.json in " + dir, "point --adapter at a PEFT adapter directory");
  auto j = nlohmann::json::parse(read_file(path), nullptr, false);
  if (j.is_discarded() || !j.is_object())
    throw Error(path + " is not a JSON object", "re-export the adapter with PEFT");
  auto get = [&](const char* k) -> const nlohmann::json* { return j.contains(k) && !j[k].is_null() ? &j[k] : nullptr; };
  auto truthy = [&](const char* k) {
    const auto* v = get(k);
    return v && v->is_boolean() && v->get<bool>();
  };
  auto nonempty = [&](const char* k) {
    const auto* v = get(k);
    return v && !v->empty();
  };

  const auto* type = get("peft_type");
  if (!type || !type->is_string() || type->get<std::string>() != "LORA") {
    throw Error(path + ": peft_type is " + (type ? type->dump() : std::string("missing")) + ", expected \"LORA\"",
                "amaq loads LoRA adapters only");
  }
  refuse_if(truthy("use_dora"), path, "use_dora", "is true");
  refuse_if(truthy("fan_in_fan_out"), path, "fan_in_fan_out", "is true");
  refuse_if(nonempty("modules_to_save"), path, "modules_to_save", "is set");
  refuse_if(nonempty("layers_to_transform"), path, "layers_to_transform", "is set");
  refuse_if(truthy("lora_bias"), path, "lora_bias", "is true");
  if (const auto* b = get("bias"))
    refuse_if(b->is_string() && b->get<std::string>() != "none", path, "bias", "is " + b->dump());

  AdapterConfig c;
  const auto* r = get("r");
  if (!r || !r->is_number_integer() || r->get<int64_t>() <= 0)
    throw Error(path + ": r must be a positive integer", "re-export the adapter with PEFT");
  c.r = r->get<int64_t>();
  if (const auto* a = get("lora_alpha")) c.lora_alpha = a->get<double>();
  if (const auto* d = get("lora_dropout")) c.lora_dropout = d->get<double>();
  c.use_rslora = truthy("use_rslora");
  // Per-module ranks and alphas, keyed by module names (PEFT also allows regular expressions).
  const auto read_pattern = [&](const char* field, auto& out) {
    const auto* p = get(field);
    if (!p) return;
    if (!p->is_object()) throw Error(path + ": " + field + " must be an object", "re-export the adapter with PEFT");
    for (const auto& [key, value] : p->items()) {
      if (key.find_first_of("*+?()[]{}|^$\\") != std::string::npos) {
        throw Error(path + ": " + field + " key '" + key + "' is a regular expression, which amaq does not implement",
                    "list module names (e.g. model.layers.3.self_attn.q_proj) as the keys");
      }
      if (!value.is_number() || value.template get<double>() <= 0) {
        throw Error(path + ": " + field + "['" + key + "'] must be a positive number",
                    "re-export the adapter with PEFT");
      }
      out[key] = value.template get<typename std::decay_t<decltype(out)>::mapped_type>();
    }
  };
  read_pattern("rank_pattern", c.rank_pattern);
  read_pattern("alpha_pattern", c.alpha_pattern);
  if (const auto* b = get("base_model_name_or_path"); b && b->is_string())
    c.base_model_name_or_path = b->get<std::string>();
  const auto* t = get("target_modules");
  if (t && t->is_array()) {
    for (const auto& e : *t) c.target_modules.push_back(e.get<std::string>());
  } else if (t && t->is_string() && t->get<std::string>() == "all-linear") {
    c.target_modules.push_back("all-linear");
  } else {
    throw Error(
        path + ": target_modules must be a list of module names or \"all-linear\", got " + (t ? t->dump() : "nothing"),
        "regular-expression targets are not supported; list the module names");
  }
  return c;
}

LoRAOptions AdapterConfig::lora_options_for(const std::string& module_name) const {
  LoRAOptions o = lora_options();
  for (const auto& [key, rank] : rank_pattern) {
    if (lora_target_matches(module_name, {key})) o.rank(rank);
  }
  for (const auto& [key, alpha] : alpha_pattern) {
    if (lora_target_matches(module_name, {key})) o.alpha(alpha);
  }
  return o;
}

nlohmann::json AdapterConfig::to_json() const {
  nlohmann::json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] =
      base_model_name_or_path.empty() ? nlohmann::json(nullptr) : nlohmann::json(base_model_name_or_path);
  j["revision"] = nullptr;
  j["r"] = r;
  j["lora_alpha"] = lora_alpha;
  j["lora_dropout"] = lora_dropout;
  j["target_modules"] = target_modules;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["use_rslora"] = use_rslora;
  j["use_dora"] = false;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["rank_pattern"] = rank_pattern.empty() ? nlohmann::json::object() : nlohmann::json(rank_pattern);
  j["alpha_pattern"] = alpha_pattern.empty() ? nlohmann::json::object() : nlohmann::json(alpha_pattern);
  return j;
}

AdapterConfig load_peft_adapter(DecoderPart& part, const std::string& dir) {
  AdapterConfig cfg = AdapterConfig::load(dir);
  std::string file = join_path(dir, "adapter_model.safetensors");
  SafetensorsFile st(file);
  at::NoGradGuard no_grad;
  int64_t adapted = 0;
  for (auto& [name, lin] : part->linears()) {
    if (!lora_target_matches(name, cfg.target_modules)) continue;
    if (!lin->has_lora()) lin->add_lora(cfg.lora_options_for(name));
    for (const char* which : {"lora_A", "lora_B"}) {
      std::string key = peft_key(name, which);
      if (!st.contains(key)) {
        throw Error("adapter " + file + " has no tensor '" + key + "'",
                    "the adapter was trained for another model or other target_modules");
      }
      at::Tensor& dst = std::string(which) == "lora_A" ? lin->lora_a : lin->lora_b;
      const TensorInfo& ti = st.info(key);
      if (ti.shape != dst.sizes().vec() || !at::isFloatingType(ti.dtype)) {
        throw Error("adapter tensor '" + key + "' is " + ti.dtype_name + " " + c10::str(at::IntArrayRef(ti.shape)) +
                        ", expected a float tensor of shape " + c10::str(dst.sizes()),
                    "r in adapter_config.json and the stored tensors disagree, or the adapter is for another model");
      }
      dst.copy_(st.load(key).to(dst.scalar_type()));
    }
    ++adapted;
  }
  if (adapted == 0 && !part->layers.empty()) {
    throw Error("adapter in " + dir + " targets no linear layer of this model",
                "check target_modules in adapter_config.json");
  }
  return cfg;
}

void save_peft_adapter(const std::vector<DecoderPart>& parts, const AdapterConfig& config, const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    throw Error("cannot create adapter directory " + dir + ": " + std::strerror(errno),
                "check the path and permissions");
  }
  NamedTensors tensors;
  for (DecoderPart part : parts) {  // a holder copy shares the module
    for (auto& [name, lin] : part->linears()) {
      if (!lin->has_lora()) continue;
      tensors.emplace_back(peft_key(name, "lora_A"), lin->lora_a.detach());
      tensors.emplace_back(peft_key(name, "lora_B"), lin->lora_b.detach());
    }
  }
  TORCH_CHECK(!tensors.empty(), "no LoRA layer to export");
  save_safetensors(join_path(dir, "adapter_model.safetensors"), tensors, {{"format", "pt"}});
  write_file_atomic(join_path(dir, "adapter_config.json"), config.to_json().dump(2) + "\n");
}

}  // namespace amaq

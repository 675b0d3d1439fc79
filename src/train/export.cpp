// `amaq export`: a run's trained parameters as one PEFT adapter, or merged into a full checkpoint.
#include "train/export.h"

#include <ATen/ATen.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "model/peft.h"
#include "train/checkpoint.h"
#include "train/options.h"
#include "train/side.h"

namespace amaq::train {
namespace {

// What a finished run left: the client's last checkpoint, the server's side options (RUN/server_adapter,
// with the final checkpoint), and the server's trained tensors: its LoRA from RUN/server_adapter, or
// (full weights, which stay on the server) its own last checkpoint of this run under `server_run_dir`.
struct RunFiles {
  nlohmann::json run;
  SideOptions client, server;
  std::map<std::string, at::Tensor> client_state, server_state;
  bool server_lora = false;
};

RunFiles read_run(const std::string& run_dir, const std::string& server_run_dir, bool need_server_weights) {
  RunFiles f;
  const std::string run_file = join_path(run_dir, "run.json");
  if (!file_exists(run_file))
    throw Error(run_dir + " is not a run directory (no run.json)", "pass the client's --run-dir");
  f.run = nlohmann::json::parse(read_file(run_file));
  const auto steps = list_checkpoints(join_path(run_dir, "checkpoints"));
  if (steps.empty()) throw Error(run_dir + " has no checkpoint", "finish the run first");
  const std::string last = checkpoint_path(join_path(run_dir, "checkpoints"), steps.back());
  // The client side as trained (a starting adapter brings its own rank and targets).
  f.client = SideOptions::from_json(nlohmann::json::parse(read_file(join_path(last, "state.json"))).at("side"));
  f.client_state = load_safetensors(join_path(last, "state.safetensors"));
  const std::string server_dir = join_path(run_dir, "server_adapter");
  if (!file_exists(join_path(server_dir, "side.json"))) {
    throw Error(run_dir + " has no server side options",
                "they arrive with the final checkpoint: finish the run (or resume it) first");
  }
  f.server = SideOptions::from_json(nlohmann::json::parse(read_file(join_path(server_dir, "side.json"))));
  f.server_lora = file_exists(join_path(server_dir, "adapter_model.safetensors"));
  if (f.server_lora) {
    f.server_state = load_safetensors(join_path(server_dir, "adapter_model.safetensors"));
  } else if (need_server_weights) {
    const std::string root = join_path(server_run_dir.empty() ? join_path(run_dir, "server") : server_run_dir,
                                       f.run.at("run_id").get<std::string>());
    const auto server_steps = list_checkpoints(root);
    if (server_steps.empty() || server_steps.back() != steps.back()) {
      throw Error("the server trained full weights, and " + root + " holds no checkpoint of step " +
                      std::to_string(steps.back()),
                  "pass --server-run-dir: the server's --run-dir (amaq train keeps it in RUN/server)");
    }
    f.server_state = load_safetensors(join_path(checkpoint_path(root, server_steps.back()), "state.safetensors"));
  }
  return f;
}

// Writes one side's training into the full model: its full weights, or W += scale * B A per LoRA layer.
void apply_side(DecoderPart& m, const SideOptions& side, const std::map<std::string, at::Tensor>& state,
                const std::string& who) {
  at::NoGradGuard no_grad;
  int64_t applied = 0;
  if (side.full) {
    for (auto& [name, t] : m->base_weights()) {
      const auto it = state.find(name);
      if (it == state.end()) continue;
      t.copy_(it->second);
      ++applied;
    }
  } else {
    for (auto& [name, lin] : m->linears()) {
      const auto a = state.find(peft_key(name, "lora_A")), b = state.find(peft_key(name, "lora_B"));
      if (a == state.end() || b == state.end()) continue;
      const double scale = LoRAOptions(a->second.size(0)).alpha(side.lora_alpha).rslora(side.rslora).scale();
      lin->weight.add_(
          (at::matmul(b->second.to(at::kDouble), a->second.to(at::kDouble)) * scale).to(lin->weight.scalar_type()));
      ++applied;
    }
  }
  if (applied == 0)
    throw Error("the " + who + "'s trained state has no tensor of this model", "was the run made with this model?");
}

}  // namespace

void export_adapter(const std::string& run_dir, const std::string& out) {
  const RunFiles f = read_run(run_dir, "", /*need_server_weights=*/false);
  if (f.client.full || f.server.full) {
    throw Error("a side of this run trained full weights", "export a merged checkpoint instead (amaq export --merged)");
  }
  if (!f.server_lora) throw Error(run_dir + " has no server adapter", "finish the run (or resume it) first");

  NamedTensors tensors;
  std::map<std::string, const SideOptions*> modules;  // HF module name -> the side that trained it
  auto take = [&](const std::map<std::string, at::Tensor>& from, const SideOptions& side) {
    const std::string prefix = "base_model.model.";
    for (const auto& [key, t] : from) {
      const auto a = key.find(".lora_A.weight"), b = key.find(".lora_B.weight");
      if (key.rfind(prefix, 0) != 0 || (a == std::string::npos && b == std::string::npos)) continue;
      tensors.emplace_back(key, t);
      if (a != std::string::npos) modules[key.substr(prefix.size(), a - prefix.size())] = &side;
    }
  };
  take(f.client_state, f.client);
  take(f.server_state, f.server);
  if (f.client.rslora != f.server.rslora)
    throw Error("the two sides disagree on rsLoRA", "PEFT has one use_rslora per adapter");
  AdapterConfig cfg;
  cfg.r = f.client.lora_r;
  cfg.lora_alpha = f.client.lora_alpha;
  cfg.lora_dropout = f.client.lora_dropout;
  cfg.use_rslora = f.client.rslora;
  cfg.base_model_name_or_path = f.run.value("model", "");
  // Exact module names, so PEFT adapts what was trained and nothing else; per-module rank and
  // alpha (PEFT's rank_pattern / alpha_pattern) where the server's side differs.
  for (const auto& [module, side] : modules) {
    cfg.target_modules.push_back(module);
    if (side->lora_r != cfg.r) cfg.rank_pattern[module] = side->lora_r;
    if (side->lora_alpha != cfg.lora_alpha) cfg.alpha_pattern[module] = side->lora_alpha;
  }
  make_dirs(out);
  save_safetensors(join_path(out, "adapter_model.safetensors"), tensors, {{"format", "pt"}});
  write_file_atomic(join_path(out, "adapter_config.json"), cfg.to_json().dump(2) + "\n");
}

void export_merged(const std::string& run_dir, const std::string& out, const std::string& server_run_dir) {
  RunFiles f = read_run(run_dir, server_run_dir, /*need_server_weights=*/true);
  const std::string model_dir = f.run.at("model").get<std::string>();
  const ModelConfig config = ModelConfig::load(model_dir);
  // A tied model split in two has the embedding on the client and the head on the server, and each
  // side trains its own (full weights, or LoRA on lm_head): merged into a model with a head of its
  // own, which is written untied where the two came apart. (A U-shaped client holds both, as one.)
  const bool two_heads = config.tie_word_embeddings && f.run.value("tail_split", int64_t{0}) == 0;
  ModelConfig built = config;
  if (two_heads) {
    built.tie_word_embeddings = false;
    const auto head = f.server_state.find("model.embed_tokens.weight");  // the server's head, so named tied
    if (head != f.server_state.end()) {
      f.server_state.emplace("lm_head.weight", head->second);
      f.server_state.erase(head);
    }
  }
  DecoderPart m = full_model(built);
  {
    const CheckpointReader ckpt(model_dir);
    at::NoGradGuard no_grad;
    for (auto& [name, param] : m->base_weights()) {
      const std::string from = two_heads && name == "lm_head.weight" ? "model.embed_tokens.weight" : name;
      param.copy_(ckpt.load(from, param.scalar_type(), param.sizes().vec()));
    }
  }
  apply_side(m, f.client, f.client_state, "client");
  apply_side(m, f.server, f.server_state, "server");
  const bool untied = two_heads && !at::equal(m->embed_tokens->weight, m->lm_head->weight);
  make_dirs(out);
  NamedTensors weights;
  for (auto& [name, t] : m->base_weights())
    if (name != "lm_head.weight" || !two_heads || untied) weights.emplace_back(name, t.detach());
  save_safetensors(join_path(out, "model.safetensors"), weights, {{"format", "pt"}});
  // The model's own config and tokenizer files travel with it; the config says when the head is its own.
  for (const char* name : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                           "tokenizer_config.json", "special_tokens_map.json"}) {
    if (!file_exists(join_path(model_dir, name))) continue;
    std::string text = read_file(join_path(model_dir, name));
    if (untied && std::string(name) == "config.json") {
      nlohmann::json j = nlohmann::json::parse(text);
      j["tie_word_embeddings"] = false;
      text = j.dump(2) + "\n";
    }
    write_file_atomic(join_path(out, name), text);
  }
}

}  // namespace amaq::train

// amaq forward: load a checkpoint (split or not, with or without a PEFT adapter), run it on token
// ids, and write the logits (and every hidden state) to safetensors. A user's check that a
// checkpoint loads right; tests and benchmarks use it too.
#include <fmt/format.h>

#include <chrono>

#include "app/commands.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "model/peft.h"

namespace amaq::app {
namespace {

struct ForwardArgs {
  std::string model, adapter, ids, out;
  int64_t split = 0;
  bool hidden = false;
};

int run_forward(const ForwardArgs& a) {
  auto t0 = std::chrono::steady_clock::now();
  ModelConfig config = ModelConfig::load(a.model);
  CheckpointReader ckpt(a.model);
  check_config_matches_weights(config, ckpt);
  SafetensorsFile io(a.ids);
  if (!io.contains("input_ids")) {
    throw Error(a.ids + " has no tensor 'input_ids'",
                "write the token ids as an int64 tensor named input_ids, shape (B, T)");
  }
  at::Tensor ids = io.load("input_ids");
  if (ids.dim() != 2 || ids.scalar_type() != at::kLong) {
    throw Error(a.ids + ": input_ids must be int64 (B, T), got " + c10::str(ids.scalar_type(), " ", ids.sizes()),
                "write the token ids as an int64 tensor named input_ids, shape (B, T)");
  }
  if (ids.numel() == 0) {
    throw Error(a.ids + ": input_ids is empty, shape " + c10::str(ids.sizes()),
                "give at least one row of at least one token");
  }
  if (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= config.vocab_size) {
    throw Error(a.ids + ": input_ids outside [0, " + std::to_string(config.vocab_size) + ")",
                "the ids were made with another tokenizer than this model's");
  }

  // The parts in order: one full model, or client then server.
  std::vector<DecoderPart> parts;
  if (a.split == 0) {
    parts.push_back(full_model(config));
  } else {
    parts.push_back(client_part(config, a.split));
    parts.push_back(server_part(config, a.split));
  }
  for (auto& p : parts) {
    p->load_weights(ckpt);
    if (!a.adapter.empty()) load_peft_adapter(p, a.adapter);
    p->eval();
  }

  at::NoGradGuard no_grad;
  std::map<int64_t, at::Tensor> hidden;
  at::Tensor x = ids;
  for (auto& p : parts) x = p->forward(x, {}, a.hidden ? &hidden : nullptr);

  NamedTensors out{{"logits", x.to(at::kFloat)}};
  for (auto& [i, h] : hidden) out.emplace_back("hidden_" + std::to_string(i), h.to(at::kFloat));
  save_safetensors(a.out, out);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("forward: {} ({} layers{}{}) on ids {}x{} -> {} ({} tensors) in {:.2f} s\n", config.architecture,
             config.num_layers, a.split ? fmt::format(", split at {}", a.split) : "",
             a.adapter.empty() ? "" : ", adapter " + a.adapter, ids.size(0), ids.size(1), a.out, out.size(), secs);
  return 0;
}

}  // namespace

Run add_forward(CLI::App& app) {
  auto a = std::make_shared<ForwardArgs>();
  app.add_option("--model", a->model, "HF model directory (config.json + safetensors)")->required();
  app.add_option("--adapter", a->adapter, "PEFT LoRA adapter directory");
  app.add_option("--split", a->split, "run as client [0,K) then server [K,L) (0 = unsplit)");
  app.add_option("--ids", a->ids, "safetensors file with int64 input_ids (B, T)")->required();
  app.add_option("--out", a->out, "output safetensors file (fp32 logits, hidden_i with --hidden)")->required();
  app.add_flag("--hidden", a->hidden, "also write every hidden state (HF output_hidden_states convention)");
  return [a] { return run_forward(*a); };
}

}  // namespace amaq::app

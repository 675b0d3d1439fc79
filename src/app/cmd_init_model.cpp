// `amaq init-model`: a fresh Llama-style checkpoint for the byte tokenizer, initialised as HF does,
// to pretrain from scratch (the demo's preset, sized by flags).
#include <fmt/format.h>

#include "app/commands.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "recipes/demo.h"

namespace amaq::app {

Run add_init_model(CLI::App& app) {
  struct Args {
    std::string out;
    recipes::PresetOptions p;
    uint64_t seed = 0;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--out", a->out, "directory to write config.json and model.safetensors into (must not hold a model)")
      ->required();
  app.add_option("--hidden", a->p.hidden, "hidden size")->capture_default_str()->check(CLI::Range(8, 1 << 16));
  app.add_option("--layers", a->p.layers, "decoder layers")->capture_default_str()->check(CLI::Range(2, 1024));
  app.add_option("--heads", a->p.heads, "attention heads")->capture_default_str()->check(CLI::Range(1, 1024));
  app.add_option("--kv-heads", a->p.kv_heads, "key/value heads (GQA)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  app.add_option("--intermediate", a->p.intermediate, "MLP width")
      ->capture_default_str()
      ->check(CLI::Range(8, 1 << 18));
  app.add_option("--max-positions", a->p.max_positions, "max_position_embeddings")
      ->capture_default_str()
      ->check(CLI::Range(8, 1 << 20));
  app.add_option("--vocab", a->p.vocab, "vocabulary size (0: the byte tokenizer's 259)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 22));
  app.add_option("--dtype", a->p.dtype, "stored dtype")->capture_default_str()->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--seed", a->seed, "seed of the initial weights")->capture_default_str();
  return [a] {
    const auto& p = a->p;
    if (p.hidden % p.heads != 0)
      throw Error(fmt::format("--hidden {} is not a multiple of --heads {}", p.hidden, p.heads),
                  "pick sizes with hidden = heads x head_dim");
    if (p.heads % p.kv_heads != 0)
      throw Error(fmt::format("--heads {} is not a multiple of --kv-heads {}", p.heads, p.kv_heads),
                  "GQA shares each key/value head among heads / kv-heads heads");
    if (file_exists(join_path(a->out, "model.safetensors")))
      throw Error(a->out + " already holds a model", "choose an empty directory");
    recipes::write_preset_model(a->out, p, a->seed);
    const ModelConfig c = ModelConfig::load(a->out);
    int64_t params = 0;
    const CheckpointReader ckpt(a->out);
    for (const auto& [name, bytes] : ckpt.sizes()) {
      int64_t n = 1;
      for (int64_t d : ckpt.info(name).shape) n *= d;
      params += n;
    }
    fmt::print(
        "init-model: {} (Llama, {} layers, hidden {}, {} heads / {} kv, MLP {}, vocab {}: {:.2f}M parameters, seed "
        "{})\n",
        a->out, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size,
        params / 1e6, a->seed);
    return 0;
  };
}

}  // namespace amaq::app

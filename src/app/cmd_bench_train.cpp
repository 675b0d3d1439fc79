// `amaq bench-train`: full training steps of the unsplit model (LoRA, AdamW) on random tokens,
// timed as the HF transformers + PEFT peer times its own (tools/ref/bench_train.sh runs both, and
// the split runs through `amaq train` / `amaq server` + `amaq client`, side by side). One JSON line.
#include <fmt/format.h>
#include <torch/version.h>

#include <chrono>
#include <functional>
#include <nlohmann/json.hpp>

#include "app/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "train/side.h"

namespace amaq::app {

Run add_bench_train(CLI::App& app) {
  struct Args {
    std::string model;
    train::SideOptions side;
    int64_t batch = 8, seq_len = 512, steps = 10, warmup = 3;
    double lr = 1e-4;
    bool cuda_graph = false;
  };
  auto a = std::make_shared<Args>();
  a->side.lora_r = 16;
  a->side.lora_alpha = 32;
  app.add_option("--model", a->model, "HF model directory (e.g. written by amaq init-model)")->required();
  app.add_option("--device", a->side.device, "cpu, cuda, cuda:N")->capture_default_str();
  app.add_option("--dtype", a->side.dtype, "fp32 or bf16")->capture_default_str();
  app.add_option("--batch", a->batch, "sequences per step")->capture_default_str()->check(CLI::Range(1, 4096));
  app.add_option("--seq-len", a->seq_len, "tokens per sequence")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  app.add_option("--steps", a->steps, "timed steps")->capture_default_str()->check(CLI::Range(1, 100000));
  app.add_option("--warmup", a->warmup, "untimed steps first")->capture_default_str()->check(CLI::Range(0, 1000));
  app.add_option("--lora-r", a->side.lora_r, "LoRA rank")->capture_default_str()->check(CLI::Range(1, 4096));
  app.add_option("--lora-alpha", a->side.lora_alpha, "LoRA alpha")->capture_default_str();
  app.add_option("--lora-targets", a->side.targets, "modules to adapt")->delimiter(',')->capture_default_str();
  app.add_option("--lr", a->lr, "AdamW learning rate")->capture_default_str();
  app.add_flag("--activation-checkpointing", a->side.activation_checkpointing, "recompute each layer in backward");
  app.add_flag(
      "--cuda-graph", a->cuda_graph,
      "capture the step (forward, loss, backward, AdamW, gradients zeroed) once as a CUDA graph and replay it");
  return [a] {
    const at::TensorOptions where = compute_options(a->side.device, a->side.dtype);
    const ModelConfig config = ModelConfig::load(a->model);
    const CheckpointReader ckpt(a->model);
    check_config_matches_weights(config, ckpt);
    DecoderPart part = full_model(config, where);
    part->load_weights(ckpt);
    train::Side side = train::Side::around(part, a->side, /*seed=*/0, /*weight_decay=*/0.01);
    const at::Device dev = side.device();
    at::manual_seed(0);
    const at::Tensor ids =
        at::randint(config.vocab_size, {a->batch, a->seq_len}, at::TensorOptions().dtype(at::kLong)).to(dev);
    std::vector<double> losses;
    // As the peer: forward, loss, backward, optimizer step, gradients cleared; no clipping.
    // --cuda-graph: the side zeroes gradients in place (a graph replays into the same memory).
    side.options.cuda_graph = a->cuda_graph;
    at::Tensor loss;
    auto run_step = [&] {
      loss = causal_lm_loss(part->forward(ids), ids);
      loss.backward();
      side.step(a->lr, 1.0);
      side.zero_grad();
    };
    std::unique_ptr<GraphedStep> graph;
    if (a->cuda_graph) {
      // The warm-up runs inside GraphedStep, and the peak memory counts it and the capture.
      synchronize(dev);
      reset_peak_memory(dev);
      graph = std::make_unique<GraphedStep>(dev, run_step, static_cast<int>(std::max<int64_t>(a->warmup, 1)));
    }
    auto step = [&] {
      if (graph)
        graph->replay();
      else
        run_step();
      return graph ? loss.detach().clone() : loss.detach();  // a graph reuses its loss tensor
    };
    for (int64_t i = 0; i < (graph ? 0 : a->warmup); ++i) losses.push_back(step().item<double>());
    synchronize(dev);
    if (!graph) reset_peak_memory(dev);
    std::vector<at::Tensor> timed;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < a->steps; ++i) timed.push_back(step());
    synchronize(dev);
    const double dt =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(a->steps);
    for (const at::Tensor& l : timed) losses.push_back(l.item<double>());
    const int64_t peak = peak_memory_bytes(dev);
    // Where a step's time goes: three more steps, each phase waited for (not part of step_s).
    double t_fwd = 0, t_bwd = 0, t_opt = 0;
    auto lap = [&](double* acc, const std::function<void()>& fn) {
      synchronize(dev);
      const auto p0 = std::chrono::steady_clock::now();
      fn();
      synchronize(dev);
      *acc += std::chrono::duration<double>(std::chrono::steady_clock::now() - p0).count() / 3;
    };
    for (int i = 0; i < (graph ? 0 : 3); ++i) {
      at::Tensor loss;
      lap(&t_fwd, [&] { loss = causal_lm_loss(part->forward(ids), ids); });
      lap(&t_bwd, [&] { loss.backward(); });
      lap(&t_opt, [&] {
        side.step(a->lr, 1.0);
        side.zero_grad();
      });
    }
    nlohmann::json out{{"bench", "amaq-train"},
                       {"mode", "unsplit"},
                       {"model", a->model},
                       {"torch", TORCH_VERSION},
                       {"device", dev.str()},
                       {"dtype", dtype_flag(part->dtype())},
                       {"batch", a->batch},
                       {"seq", a->seq_len},
                       {"lora_r", side.options.lora_r},
                       {"activation_checkpointing", side.options.activation_checkpointing},
                       {"cuda_graph", a->cuda_graph},
                       {"steps", a->steps},
                       {"step_s", dt},
                       {"tokens_per_s", static_cast<double>(a->batch * a->seq_len) / dt},
                       {"peak_gpu_mem_gb", peak < 0 ? nlohmann::json(nullptr) : nlohmann::json(peak / 1e9)},
                       {"phases_s", {{"forward", t_fwd}, {"backward", t_bwd}, {"optimizer", t_opt}}},
                       {"loss_first", losses.front()},
                       {"loss_last", losses.back()}};
    fmt::print("{}\n", out.dump());
    return 0;
  };
}

}  // namespace amaq::app

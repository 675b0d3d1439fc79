#include "train/side.h"

#include <torch/version.h>

#include <cmath>

#include "core/device.h"
#include "core/error.h"
#include "core/torch_io.h"
#include "model/peft.h"

namespace amaq::train {

void check_cuda_graph(const SideOptions& options, at::Device device) {
  if (!options.cuda_graph) return;
  const char* why = !device.is_cuda()                  ? "the side computes on the CPU"
                    : options.lora_dropout > 0         ? "LoRA dropout draws new random numbers every step"
                    : options.activation_checkpointing ? "activation checkpointing is on"
                                                       : nullptr;
  if (why) {
    throw Error(std::string("--cuda-graph cannot capture this side's step: ") + why,
                "use --device cuda, LoRA dropout 0 and no activation checkpointing, or leave out --cuda-graph");
  }
}

std::vector<DecoderPart> side_parts(const ModelConfig& config, SideRole role, int64_t split, int64_t tail_split,
                                    const at::TensorOptions& where) {
  if (role == SideRole::kServer) {
    return {tail_split > 0 ? middle_part(config, split, tail_split, where) : server_part(config, split, where)};
  }
  std::vector<DecoderPart> parts{client_part(config, split, where)};
  if (tail_split > 0) parts.push_back(tail_part(config, split, tail_split, where));
  return parts;
}

Side Side::build(const ModelConfig& config, const CheckpointReader& ckpt, SideRole role, int64_t split,
                 const SideOptions& options, uint64_t seed, double weight_decay,
                 const std::map<std::string, at::Tensor>* shared_base, int64_t tail_split) {
  check_config_matches_weights(config, ckpt);  // before the part allocates anything
  const at::TensorOptions where = compute_options(options.device, options.dtype);
  const bool share = shared_base && !options.full;
  std::vector<DecoderPart> parts;
  {
    // Every base weight is loaded or shared below: a shared one needs no storage of its own.
    UnfilledBaseWeights unfilled(share ? UnfilledBaseWeights::Storage::kPlaceholder
                                       : UnfilledBaseWeights::Storage::kAllocated);
    parts = side_parts(config, role, split, tail_split, where);
  }
  // The U-shaped client holds the embedding and the head: a tied model's are one matrix, as unsplit,
  // not two copies (trained once in full; frozen, its memory once), unless LoRA adapts the head.
  if (config.tie_word_embeddings && parts.size() > 1) {
    const bool head_adapted =
        !options.full && lora_target_matches("lm_head", options.init_adapter.empty()
                                                            ? options.targets
                                                            : AdapterConfig::load(options.init_adapter).target_modules);
    if (!head_adapted) parts[1]->tie_head_to(parts[0]->embed_tokens->weight);
  }
  for (DecoderPart& part : parts) {
    if (share) {
      part->share_base_weights(*shared_base);
    } else {
      part->load_weights(ckpt);
    }
  }
  return around(parts[0], options, seed, weight_decay, parts.size() > 1 ? parts[1] : nullptr);
}

Side Side::around(DecoderPart part, const SideOptions& options, uint64_t seed, double weight_decay, DecoderPart tail) {
  Side s;
  s.options = options;
  s.part = part;
  s.tail = tail;
  if (options.full) {
    for (DecoderPart& p : s.parts()) p->set_base_trainable(true);
  } else if (!options.init_adapter.empty()) {
    // The adapter's own hyper-parameters are what this side trains with from here on.
    AdapterConfig a;
    for (DecoderPart& p : s.parts()) a = load_peft_adapter(p, options.init_adapter);
    s.options.lora_r = a.r;
    s.options.lora_alpha = a.lora_alpha;
    s.options.lora_dropout = a.lora_dropout;
    s.options.rslora = a.use_rslora;
    s.options.targets = a.target_modules;
  } else {
    std::lock_guard<std::mutex> lock(rng_mutex());
    at::manual_seed(seed);
    int64_t adapted = 0;
    for (DecoderPart& p : s.parts()) {
      adapted += apply_lora(
          p, LoRAOptions(options.lora_r).alpha(options.lora_alpha).dropout(options.lora_dropout).rslora(options.rslora),
          options.targets);
    }
    if (adapted == 0) {
      throw Error("LoRA targets match no linear layer of this side",
                  "check --lora-targets (e.g. all-linear, q_proj,v_proj)");
    }
  }
  std::vector<at::Tensor> params;
  for (DecoderPart& p : s.parts()) {
    p->set_activation_checkpointing(options.activation_checkpointing);
    for (const at::Tensor& t : p->trainable_parameters()) params.push_back(t);
  }
  check_cuda_graph(s.options, s.part->device());
  if (params.empty()) throw Error("this side has nothing to train", "set LoRA targets or --full");
  s.opt = std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(1e-3).weight_decay(weight_decay));
  return s;
}

std::vector<DecoderPart> Side::parts() const {
  std::vector<DecoderPart> out{part};
  if (tail) out.push_back(tail);
  return out;
}

uint64_t owned_bytes_estimate(const ModelConfig& config, SideRole role, int64_t split, const SideOptions& options,
                              int64_t tail_split) {
  const at::TensorOptions where = at::TensorOptions().dtype(parse_dtype(options.dtype));
  std::vector<DecoderPart> parts;
  {
    UnfilledBaseWeights unfilled(UnfilledBaseWeights::Storage::kPlaceholder);  // only shapes are read
    parts = side_parts(config, role, split, tail_split, where);
  }
  const uint64_t adam = 2 * sizeof(float);
  uint64_t bytes = 0;
  for (DecoderPart& part : parts) {
    if (options.full) {
      for (auto& [name, t] : part->base_weights())
        bytes += static_cast<uint64_t>(t.numel()) * (2 * t.element_size() + adam);
      continue;
    }
    for (auto& [name, lin] : part->linears()) {
      if (!lora_target_matches(name, options.targets)) continue;
      const auto n = static_cast<uint64_t>(options.lora_r * (lin->weight.size(0) + lin->weight.size(1)));
      bytes += n * (2 * sizeof(float) + adam);
    }
  }
  return bytes;
}

NamedTensors Side::trained() {
  NamedTensors out;
  for (DecoderPart& p : parts()) {
    if (options.full) {
      for (auto& named : p->base_weights()) out.push_back(std::move(named));
      continue;
    }
    for (auto& [name, lin] : p->linears()) {
      if (!lin->has_lora()) continue;
      out.emplace_back(peft_key(name, "lora_A"), lin->lora_a);
      out.emplace_back(peft_key(name, "lora_B"), lin->lora_b);
    }
  }
  return out;
}

NamedTensors Side::state() {
  NamedTensors out = trained();
  for (auto& [name, t] : out) t = t.detach().to(at::kCPU);
  return out;
}

void Side::load_state(const std::map<std::string, at::Tensor>& tensors, const std::string& what) {
  at::NoGradGuard no_grad;
  for (auto& [name, t] : trained()) {
    auto it = tensors.find(name);
    if (it == tensors.end())
      throw Error(what + " has no tensor '" + name + "'", "the checkpoint is from a run with other LoRA targets");
    if (it->second.sizes() != t.sizes()) {
      throw Error(what + ": tensor '" + name + "' has shape " + c10::str(it->second.sizes()) + ", expected " +
                      c10::str(t.sizes()),
                  "the checkpoint is from a run with another LoRA rank or model");
    }
    t.copy_(it->second);
  }
}

double Side::grad_sq_norm() const {
  // Summed on the side's device in the parameters' order, read back once.
  at::Tensor sq = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(part->device()));
  for (const auto& group : opt->param_groups()) {
    for (const auto& p : group.params()) {
      if (p.grad().defined()) sq = sq + p.grad().to(at::kDouble).pow(2).sum();
    }
  }
  return sq.item<double>();
}

// torch::optim::AdamW steps each parameter with its own handful of kernels: measured on an H100,
// 16.5 ms of an 86 ms step for the 160M shape's 168 LoRA tensors. On CUDA (PyTorch 2.x) the same
// update runs as PyTorch's fused multi-tensor kernel, what torch.optim.AdamW(fused=True) calls. The
// state stays in the AdamW object (created as it creates it), so checkpoints do not change.
bool Side::fused_step(double coef) {
#if TORCH_VERSION_MAJOR >= 2
  if (!part->device().is_cuda() || opt->param_groups().size() != 1) return false;
  at::NoGradGuard no_grad;
  auto& group = opt->param_groups()[0];
  const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
  if (o.amsgrad()) return false;
  // One kernel takes one device and dtype: anything else steps through torch's AdamW (checked
  // before any state is touched).
  for (auto& p : group.params())
    if (p.grad().defined() && (!p.is_cuda() || p.scalar_type() != group.params()[0].scalar_type())) return false;
  std::vector<at::Tensor> ps, gs, ms, vs, steps;
  size_t i = 0;
  for (auto& p : group.params()) {
    if (!p.grad().defined()) continue;
    auto& slot = opt->state()[p.unsafeGetTensorImpl()];
    if (!slot) {
      auto st = std::make_unique<torch::optim::AdamWParamState>();
      st->step(0);
      st->exp_avg(at::zeros_like(p, at::MemoryFormat::Preserve));
      st->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
      slot = std::move(st);
    }
    auto& st = static_cast<torch::optim::AdamWParamState&>(*slot);
    if (fused_steps_.size() <= i) {
      fused_steps_.resize(i + 1);
      fused_steps_host_.resize(i + 1, -1);
    }
    if (fused_steps_host_[i] != st.step()) {  // new, or the state was loaded from a checkpoint
      fused_steps_[i] = at::full({}, static_cast<double>(st.step()), p.options().dtype(at::kFloat));
      fused_steps_host_[i] = st.step();
    }
    st.step(st.step() + 1);
    ++fused_steps_host_[i];
    ps.push_back(p);
    gs.push_back(p.grad());
    ms.push_back(st.exp_avg());
    vs.push_back(st.exp_avg_sq());
    steps.push_back(fused_steps_[i]);
    ++i;
  }
  if (ps.empty()) return true;
  if (coef != 1.0) at::_foreach_mul_(gs, coef);
  at::_foreach_add_(steps, 1.0);
  at::_fused_adamw_(ps, gs, ms, vs, {}, steps, o.lr(), std::get<0>(o.betas()), std::get<1>(o.betas()), o.weight_decay(),
                    o.eps(), /*amsgrad=*/false, /*maximize=*/false);
  return true;
#else
  (void)coef;
  return false;
#endif
}

void Side::step(double lr, double coef) {
  for (auto& group : opt->param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
  if (fused_step(coef)) return;
  for (auto& group : opt->param_groups()) {
    if (coef != 1.0) {
      for (auto& p : group.params()) {
        if (p.grad().defined()) p.mutable_grad().mul_(coef);
      }
    }
  }
  opt->step();
}

void Side::zero_grad() {
  if (!options.cuda_graph) {
    opt->zero_grad();
    return;
  }
  at::NoGradGuard no_grad;
  for (const at::Tensor& p : part->parameters())
    if (p.grad().defined()) p.grad().zero_();
}

at::Tensor GraphedBackward::run(Side& side, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& labels,
                                int64_t micro_batches, at::Tensor* h_grad) {
  // A batch without padding runs with no mask at all, as the eager forward does with a mask of ones.
  const bool padded = mask.defined() && mask.min().item<int64_t>() == 0;
  std::vector<int64_t> key(h.sizes().begin(), h.sizes().end());
  key.push_back(padded);
  key.push_back(micro_batches);
  at::NoGradGuard no_grad;
  if (!graph_ || key != key_) {
    graph_.reset();
    const at::Device dev = side.device();
    h_ = at::empty(h.sizes(), h.options().device(dev).dtype(side.part->dtype()));
    h_.requires_grad_(true);
    labels_ = at::empty(labels.sizes(), labels.options().device(dev));
    mask_ = padded ? at::empty(mask.sizes(), mask.options().device(dev)) : at::Tensor();
    h_.copy_(h);
    labels_.copy_(labels);
    if (padded) mask_.copy_(mask);
    // The warm-up runs are real backward passes: the gradients as they were are put back after.
    std::vector<at::Tensor> before;
    const std::vector<at::Tensor> params = side.part->parameters();
    for (const at::Tensor& p : params) before.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
    graph_ = std::make_unique<GraphedStep>(
        dev,
        [this, &side, micro_batches] {
          at::AutoGradMode grad(true);
          if (h_.grad().defined()) h_.grad().zero_();
          loss_ = causal_lm_loss(side.part->forward(h_, mask_), labels_);
          (loss_ / static_cast<double>(micro_batches)).backward();
        },
        2);
    for (size_t i = 0; i < params.size(); ++i) {
      if (!params[i].grad().defined()) continue;
      if (before[i].defined())
        params[i].grad().copy_(before[i]);
      else
        params[i].grad().zero_();
    }
    key_ = key;
  } else {
    h_.copy_(h);
    labels_.copy_(labels);
    if (padded) mask_.copy_(mask);
  }
  graph_->replay();
  *h_grad = h_.grad().clone();
  return loss_.detach();
}

double clip_coefficient(double total_sq_norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  const double coef = max_norm / (std::sqrt(total_sq_norm) + 1e-6);
  return coef < 1.0 ? coef : 1.0;
}

}  // namespace amaq::train

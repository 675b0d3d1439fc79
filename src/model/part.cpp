#include "model/part.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <limits>
#include <set>

#include "core/error.h"
#include "core/hash.h"
#include "model/gemm.h"

namespace amaq {

namespace {

// Activation checkpointing, as torch.utils.checkpoint's reentrant form: a layer's forward keeps only
// its input; backward runs the layer again with gradients on and back-propagates through that copy
// (the parameters' gradients accumulate as usual; the input's is returned). Recomputation is
// deterministic (no dropout: DecoderPartImpl refuses LoRA dropout with checkpointing), so the
// gradients are those of the plain forward.
struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  // bias: an empty tensor stands for "no bias" (custom functions take no undefined inputs).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& bias, DecoderLayerImpl* layer) {
    ctx->save_for_backward({h, cos, sin, bias});
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    return layer->forward(h, cos, sin, bias.numel() ? bias : at::Tensor());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    at::Tensor h = saved[0].detach().requires_grad_(true);
    at::AutoGradMode grad_on(true);
    at::Tensor out = layer->forward(h, saved[1], saved[2], saved[3].numel() ? saved[3] : at::Tensor());
    torch::autograd::backward({out}, {grads[0]});
    return {h.grad(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

EmbeddingImpl::EmbeddingImpl(int64_t vocab, int64_t dim, const at::TensorOptions& opt) {
  weight = register_parameter("weight", UnfilledBaseWeights::make({vocab, dim}, 0, opt), false);
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) {
  return at::embedding(weight, ids);
}

DecoderPartImpl::DecoderPartImpl(const ModelConfig& config, int64_t layer_begin, int64_t layer_end,
                                 const at::TensorOptions& opt, bool head)
    : config_(config),
      layer_begin_(layer_begin),
      layer_end_(layer_end),
      head_(head && layer_end == config.num_layers),
      dtype_(at::typeMetaToScalarType(opt.dtype())),
      device_(opt.device()) {
  TORCH_CHECK(0 <= layer_begin && layer_begin <= layer_end && layer_end <= config.num_layers, "layer range [",
              layer_begin, ", ", layer_end, ") is outside [0, ", config.num_layers, "]");
  if (has_embedding())
    embed_tokens = register_module("embed_tokens", Embedding(config.vocab_size, config.hidden_size, opt));
  // Children are named by their global layer index so parameter names match the checkpoint's.
  auto stack = std::make_shared<torch::nn::Module>("layers");
  for (int64_t i = layer_begin; i < layer_end; ++i) {
    layers.push_back(stack->register_module(std::to_string(i), DecoderLayer(config, opt)));
  }
  register_module("layers", stack);
  if (has_head()) {
    norm = register_module("norm", RMSNorm(config.hidden_size, config.rms_norm_eps, opt));
    if (!(config.tie_word_embeddings && has_embedding())) {
      lm_head = register_module("lm_head", Linear(config.hidden_size, config.vocab_size, false, opt));
    }
  }
  inv_freq_ = functional::rope_inv_freq(config.rope, config.head_dim).to(device_);
}

at::Tensor DecoderPartImpl::forward(const at::Tensor& input, const at::Tensor& attention_mask,
                                    std::map<int64_t, at::Tensor>* hidden) {
  at::Tensor h;
  if (has_embedding()) {
    TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kLong, "expected token ids (B, T) int64, got ",
                input.sizes(), " ", input.scalar_type());
    h = embed_tokens->forward(input.to(device_));
    if (hidden) (*hidden)[0] = h;
  } else {
    TORCH_CHECK(input.dim() == 3 && input.size(2) == config_.hidden_size, "expected a hidden state (B, T, ",
                config_.hidden_size, "), got ", input.sizes());
    h = input.to(device_, dtype_);
  }
  const int64_t B = h.size(0), T = h.size(1);
  auto [cos, sin] = functional::rope_tables(inv_freq_, T, dtype_, h.device());
  // No padding (a mask of ones, checked where it is cheap: on the CPU, and only where the causal
  // kernel exists) and no window: that kernel needs no bias at all.
  const bool padded = attention_mask.defined() &&
                      (!AMAQ_HAVE_SDPA || attention_mask.is_cuda() || attention_mask.min().item<int64_t>() == 0);
  std::map<int64_t, at::Tensor> bias_by_window;
  for (size_t n = 0; n < layers.size(); ++n) {
    const int64_t i = layer_begin_ + static_cast<int64_t>(n);
    const int64_t window = config_.layer_window[i];
    auto it = bias_by_window.find(window);
    if (it == bias_by_window.end()) {
      at::Tensor bias;
      if (!AMAQ_HAVE_SDPA || padded || window > 0)
        bias = functional::attention_bias(attention_mask, B, T, window, dtype_, h.device());
      it = bias_by_window.emplace(window, bias).first;
    }
    if (checkpointing_ && at::GradMode::is_enabled()) {
      const at::Tensor& bias = it->second;
      // The parameters are not inputs of the function: an input that needs no gradient (the frozen
      // embeddings' output) is made to need one, or the function would not be recorded at all.
      const at::Tensor in = h.requires_grad() ? h : h.detach().requires_grad_(true);
      h = CheckpointedLayer::apply(in, cos, sin, bias.defined() ? bias : at::empty({0}, h.options()), layers[n].get());
    } else {
      h = layers[n]->forward(h, cos, sin, it->second);
    }
    if (hidden && i + 1 < config_.num_layers) (*hidden)[i + 1] = h;
  }
  if (!has_head()) return h;
  h = norm->forward(h);
  if (hidden) (*hidden)[config_.num_layers] = h;
  return logits(h);
}

at::Tensor DecoderPartImpl::forward_cached(const at::Tensor& input, std::vector<KvEntry>* cache) {
  at::Tensor h = has_embedding() ? embed_tokens->forward(input.to(device_)) : input.to(device_, dtype_);
  const int64_t B = h.size(0), T = h.size(1);
  cache->resize(layers.size());
  const int64_t past = cache->front().k.defined() ? cache->front().k.size(2) : 0;
  auto [cos, sin] = functional::rope_tables(inv_freq_, past + T, dtype_, h.device());
  cos = cos.narrow(0, past, T);
  sin = sin.narrow(0, past, T);
  // Query i (position past + i) sees key j when j <= past + i and, with a window, past + i - j < window.
  auto opt = at::TensorOptions().dtype(at::kLong).device(h.device());
  const at::Tensor qi = at::arange(past, past + T, opt).unsqueeze(1), kj = at::arange(past + T, opt).unsqueeze(0);
  for (size_t n = 0; n < layers.size(); ++n) {
    const int64_t window = config_.layer_window[layer_begin_ + static_cast<int64_t>(n)];
    at::Tensor allowed = kj <= qi;
    if (window > 0) allowed = allowed.logical_and(qi - kj < window);
    at::Tensor bias =
        at::zeros({1, 1, T, past + T}, h.options())
            .masked_fill(allowed.logical_not().view({1, 1, T, past + T}), -std::numeric_limits<float>::infinity());
    h = layers[n]->forward(h, cos, sin, bias.expand({B, 1, T, past + T}), &(*cache)[n]);
  }
  if (!has_head()) return h;
  h = norm->forward(h);
  return logits(h);
}

at::Tensor DecoderPartImpl::logits(const at::Tensor& h) {
  if (lm_head) return lm_head->forward(h);
  return functional::frozen_linear(h, tied_head_.defined() ? tied_head_ : embed_tokens->weight, {});
}

void DecoderPartImpl::tie_head_to(const at::Tensor& embed_weight) {
  TORCH_CHECK(has_head() && !has_embedding() && lm_head, "tie_head_to: this part has no head of its own to tie");
  TORCH_CHECK(embed_weight.sizes() == lm_head->weight.sizes() && embed_weight.scalar_type() == dtype_ &&
                  embed_weight.device() == device_,
              "tie_head_to: the embedding matrix differs from the head in shape, dtype or device");
  unregister_module("lm_head");
  lm_head = nullptr;
  tied_head_ = embed_weight;
}

std::vector<std::pair<std::string, at::Tensor>> DecoderPartImpl::base_weights() {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : named_parameters()) {
    const std::string& name = p.key();
    if (name.find("lora_") != std::string::npos) continue;
    std::string hf = name;
    if (name == "lm_head.weight") {
      hf = config_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    } else {
      hf = "model." + name;
    }
    out.emplace_back(hf, p.value());
  }
  return out;
}

void DecoderPartImpl::load_weights(const CheckpointReader& ckpt) {
  at::NoGradGuard no_grad;
  for (auto& [name, param] : base_weights()) {
    // One tensor at a time through host memory, converted there to the compute dtype: staging is
    // bounded by the largest tensor, never a full fp32 copy of the part.
    param.copy_(ckpt.load(name, dtype_, param.sizes().vec()));
  }
}

void DecoderPartImpl::share_base_weights(const std::map<std::string, at::Tensor>& weights) {
  at::NoGradGuard no_grad;
  for (auto& [name, param] : base_weights()) {
    auto it = weights.find(name);
    if (it == weights.end() || it->second.sizes() != param.sizes() || it->second.dtype() != param.dtype() ||
        it->second.device() != param.device()) {
      throw Error("shared base weight '" + name + "' is missing or differs from this part's",
                  "share weights only between parts of the same model, split, dtype and device");
    }
    param.set_(it->second);
  }
}

std::vector<std::pair<std::string, Linear>> DecoderPartImpl::linears() {
  std::vector<std::pair<std::string, Linear>> out;
  for (const auto& m : named_modules("", /*include_self=*/false)) {
    if (auto lin = std::dynamic_pointer_cast<LinearImpl>(m.value())) {
      out.emplace_back(m.key() == "lm_head" ? "lm_head" : "model." + m.key(), Linear(lin));
    }
  }
  return out;
}

void DecoderPartImpl::set_activation_checkpointing(bool on) {
  if (on) {
    for (auto& [name, lin] : linears()) {
      if (lin->has_lora() && lin->lora_options().dropout() > 0) {
        throw Error("activation checkpointing with LoRA dropout: the recomputed forward would draw other masks",
                    "set --lora-dropout 0, or leave --activation-checkpointing off");
      }
    }
  }
  checkpointing_ = on;
}

void DecoderPartImpl::set_base_trainable(bool trainable) {
  for (auto& [name, param] : base_weights()) param.set_requires_grad(trainable);
}

std::vector<at::Tensor> DecoderPartImpl::trainable_parameters() {
  std::vector<at::Tensor> out;
  std::set<const void*> seen;
  for (const auto& p : parameters()) {
    if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) out.push_back(p);
  }
  return out;
}

static void check_split(const ModelConfig& config, int64_t split) {
  if (split < 1 || split >= config.num_layers) {
    throw Error("split layer " + std::to_string(split) + " is outside [1, " + std::to_string(config.num_layers - 1) +
                    "] for a model with " + std::to_string(config.num_layers) + " layers",
                "k = 0 would leave the client no layer (its raw embeddings would reveal the tokens); k = L would leave "
                "the server nothing to run; pick 1 <= k < L");
  }
}

DecoderPart client_part(const ModelConfig& config, int64_t split, const at::TensorOptions& opt) {
  check_split(config, split);
  return DecoderPart(config, 0, split, opt);
}

DecoderPart server_part(const ModelConfig& config, int64_t split, const at::TensorOptions& opt) {
  check_split(config, split);
  return DecoderPart(config, split, config.num_layers, opt);
}

void check_tail_split(const ModelConfig& config, int64_t split, int64_t tail_split) {
  check_split(config, split);
  if (tail_split <= split || tail_split > config.num_layers) {
    throw Error("tail split " + std::to_string(tail_split) + " is outside [" + std::to_string(split + 1) + ", " +
                    std::to_string(config.num_layers) + "] for split " + std::to_string(split) + " of a model with " +
                    std::to_string(config.num_layers) + " layers",
                "the server keeps layers [k, m) and the client [m, L) with the head and the loss: pick k < m <= L");
  }
}

DecoderPart middle_part(const ModelConfig& config, int64_t split, int64_t tail_split, const at::TensorOptions& opt) {
  check_tail_split(config, split, tail_split);
  return DecoderPart(config, split, tail_split, opt, /*head=*/false);
}

DecoderPart tail_part(const ModelConfig& config, int64_t split, int64_t tail_split, const at::TensorOptions& opt) {
  check_tail_split(config, split, tail_split);
  return DecoderPart(config, tail_split, config.num_layers, opt);
}

DecoderPart full_model(const ModelConfig& config, const at::TensorOptions& opt) {
  return DecoderPart(config, 0, config.num_layers, opt);
}

std::string model_fingerprint(const ModelConfig& config, const CheckpointReader& ckpt) {
  std::string canon = config.to_json().dump();
  for (const auto& [name, bytes] : ckpt.sizes()) {
    const TensorInfo& ti = ckpt.info(name);
    canon += "\n" + name + ":" + ti.dtype_name + ":" + c10::str(at::IntArrayRef(ti.shape));
  }
  return sha256_hex(canon);
}

void check_config_matches_weights(const ModelConfig& config, const CheckpointReader& ckpt) {
  const std::string hint = "use the config.json that came with these weights";
  std::vector<std::string> names;
  for (const auto& [name, bytes] : ckpt.sizes()) names.push_back(name);
  const std::string embed = "model.embed_tokens.weight";
  if (std::find(names.begin(), names.end(), embed) != names.end()) {
    const std::vector<int64_t>& shape = ckpt.info(embed).shape;
    if (shape != std::vector<int64_t>{config.vocab_size, config.hidden_size}) {
      throw Error("config.json gives vocab_size " + std::to_string(config.vocab_size) + " and hidden_size " +
                      std::to_string(config.hidden_size) + ", but " + embed + " has shape " +
                      c10::str(at::IntArrayRef(shape)),
                  hint);
    }
  }
  int64_t layers = 0;  // 1 + the highest model.layers.N in the checkpoint
  const std::string prefix = "model.layers.";
  for (const std::string& n : names) {
    if (n.rfind(prefix, 0) != 0) continue;
    const size_t dot = n.find('.', prefix.size());
    const std::string index = n.substr(prefix.size(), dot - prefix.size());
    if (index.empty() || index.size() > 6 || index.find_first_not_of("0123456789") != std::string::npos) continue;
    layers = std::max<int64_t>(layers, std::stoll(index) + 1);
  }
  if (layers > 0 && layers != config.num_layers) {
    throw Error("config.json gives num_hidden_layers " + std::to_string(config.num_layers) +
                    ", but the checkpoint holds layers 0.." + std::to_string(layers - 1),
                hint);
  }
}

at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(
      logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) && logits.size(1) == labels.size(1),
      "expected logits (B, T, V) and labels (B, T), got ", logits.sizes(), " and ", labels.sizes());
  const int64_t T = logits.size(1), V = logits.size(2);
  at::Tensor l = logits.narrow(1, 0, T - 1).reshape({-1, V}).to(at::kFloat);
  at::Tensor y = labels.narrow(1, 1, T - 1).reshape({-1}).to(l.device(), at::kLong);
  return at::cross_entropy_loss(l, y, {}, at::Reduction::Mean, /*ignore_index=*/-100, /*label_smoothing=*/0.0);
}

bool lora_target_matches(const std::string& module_name, const std::vector<std::string>& targets) {
  for (const auto& t : targets) {
    if (t == "all-linear") {
      if (module_name != "lm_head") return true;
      continue;
    }
    if (module_name == t) return true;
    if (module_name.size() > t.size() && module_name.compare(module_name.size() - t.size(), t.size(), t) == 0 &&
        module_name[module_name.size() - t.size() - 1] == '.') {
      return true;
    }
  }
  return false;
}

int64_t apply_lora(DecoderPart& part, const LoRAOptions& opt, const std::vector<std::string>& targets) {
  int64_t n = 0;
  for (auto& [name, lin] : part->linears()) {
    if (lora_target_matches(name, targets)) {
      lin->add_lora(opt);
      ++n;
    }
  }
  return n;
}

}  // namespace amaq

#include "model/layers.h"

#include <torch/nn/init.h>

#include <cmath>
#include <limits>
#include <optional>

#include "model/gemm.h"

namespace amaq {

namespace {
thread_local std::optional<UnfilledBaseWeights::Storage> t_unfilled;  // the innermost scope alive; none: filled
}  // namespace

UnfilledBaseWeights::UnfilledBaseWeights(Storage storage) : outer_(t_unfilled) {
  t_unfilled = storage;
}
UnfilledBaseWeights::~UnfilledBaseWeights() {
  t_unfilled = outer_;
}
at::Tensor UnfilledBaseWeights::make(at::IntArrayRef sizes, double value, const at::TensorOptions& opt) {
  if (!t_unfilled) return at::full(sizes, value, opt);
  if (*t_unfilled == Storage::kAllocated) return at::empty(sizes, opt);
  return at::empty_strided(sizes, std::vector<int64_t>(sizes.size(), 0), opt);
}

double LoRAOptions::scale() const {
  return rslora_ ? alpha_ / std::sqrt(static_cast<double>(rank_)) : alpha_ / static_cast<double>(rank_);
}

LinearImpl::LinearImpl(int64_t in, int64_t out, bool with_bias, const at::TensorOptions& opt) {
  // Filled by the checkpoint loader; frozen unless full fine-tuning is asked for.
  weight = register_parameter("weight", UnfilledBaseWeights::make({out, in}, 0, opt), /*requires_grad=*/false);
  if (with_bias) bias = register_parameter("bias", UnfilledBaseWeights::make({out}, 0, opt), false);
}

void LinearImpl::add_lora(const LoRAOptions& opt) {
  TORCH_CHECK(opt.rank() > 0, "LoRA rank must be positive, got ", opt.rank());
  TORCH_CHECK(!has_lora(), "this layer already has a LoRA adapter");
  lora_opt_ = opt;
  const bool reduced = weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf;
  auto o = at::TensorOptions().dtype(reduced ? at::kFloat : weight.scalar_type()).device(weight.device());
  // Drawn on the CPU whatever the device, so a seed gives the same adapter on every device.
  at::Tensor a = at::empty({opt.rank(), weight.size(1)}, o.device(at::kCPU));
  {
    at::NoGradGuard g;
    torch::nn::init::kaiming_uniform_(a, std::sqrt(5.0));
  }
  lora_a = register_parameter("lora_A", a.to(weight.device()), true);
  lora_b = register_parameter("lora_B", at::zeros({weight.size(0), opt.rank()}, o), true);
}

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  if (!has_lora())
    return weight.requires_grad() ? at::linear(x, weight, bias) : functional::frozen_linear(x, weight, bias);
  // y = x W^T + b, then y += scale * (xd A^T) B^T as one GEMM accumulating into y (no full-size
  // temporaries). On 2-D views: y is a fresh base tensor, and x W^T is not saved for backward, so
  // updating it in place is safe.
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  at::Tensor y =
      weight.requires_grad() ? at::linear(x2, weight, bias) : functional::frozen_linear(x2, weight, bias);  // (N, out)
  const at::Tensor xd = lora_opt_.dropout() > 0 ? at::dropout(x2, lora_opt_.dropout(), is_training()) : x2;
  const bool cast = lora_a.scalar_type() != x.scalar_type();  // fp32 LoRA over bf16 weights
  const at::Tensor a = cast ? lora_a.to(x.scalar_type()) : lora_a, b = cast ? lora_b.to(x.scalar_type()) : lora_b;
  y.addmm_(at::linear(xd, a), b.t(), /*beta=*/1, /*alpha=*/lora_opt_.scale());
  return y.view(out_shape);
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, const at::TensorOptions& opt) : eps(eps_) {
  weight = register_parameter("weight", UnfilledBaseWeights::make({dim}, 1, opt), false);
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  // HF: normalise in fp32, cast back to the input dtype, then scale.
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + eps);
  return weight * h.to(x.scalar_type());
}

namespace functional {
namespace {
/// torch.finfo(dtype).min, which HF uses for masked attention scores.
double lowest_value(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return -65504.0;
    case at::kBFloat16:
      return -3.3895313892515355e38;
    case at::kDouble:
      return std::numeric_limits<double>::lowest();
    default:
      return std::numeric_limits<float>::lowest();
  }
}
}  // namespace

at::Tensor rope_inv_freq(const RopeConfig& rope, int64_t head_dim) {
  at::Tensor idx = at::arange(0, head_dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat);
  at::Tensor inv_freq = 1.0 / at::pow(rope.theta, idx / static_cast<double>(head_dim));
  if (rope.type == "linear") return inv_freq / rope.factor;
  if (rope.type != "llama3") return inv_freq;
  // Llama 3.1: long wavelengths scaled down by `factor`, short ones kept, a smooth ramp between.
  const double old_len = static_cast<double>(rope.original_max_position_embeddings);
  const double low_wavelen = old_len / rope.low_freq_factor;
  const double high_wavelen = old_len / rope.high_freq_factor;
  at::Tensor wavelen = 2 * M_PI / inv_freq;
  at::Tensor scaled = at::where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq);
  at::Tensor smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled;
  at::Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
  return at::where(medium, smoothed, scaled);
}

std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& inv_freq, int64_t T, at::ScalarType dtype,
                                              at::Device device) {
  at::Tensor pos = at::arange(T, at::TensorOptions().dtype(at::kFloat).device(device));
  at::Tensor freqs = at::outer(pos, inv_freq.to(device));  // (T, D/2)
  at::Tensor emb = at::cat({freqs, freqs}, -1);            // (T, D)
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  int64_t half = x.size(-1) / 2;
  at::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  at::Tensor rotated = at::cat({-x2, x1}, -1);
  return x * cos + rotated * sin;
}

at::Tensor attention_bias(const at::Tensor& attention_mask, int64_t B, int64_t T, int64_t window, at::ScalarType dtype,
                          at::Device device) {
  auto opt = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor i = at::arange(T, opt).unsqueeze(1), j = at::arange(T, opt).unsqueeze(0);
  at::Tensor allowed = j <= i;  // (T, T)
  if (window > 0) allowed = allowed.logical_and(i - j < window);
  allowed = allowed.view({1, 1, T, T}).expand({B, 1, T, T});
  if (attention_mask.defined()) {
    TORCH_CHECK(attention_mask.dim() == 2 && attention_mask.size(0) == B && attention_mask.size(1) == T,
                "attention_mask must be (B, T) = (", B, ", ", T, "), got ", attention_mask.sizes());
    allowed = allowed.logical_and(attention_mask.to(device).to(at::kBool).view({B, 1, 1, T}));
  }
  at::Tensor bias = at::zeros({B, 1, T, T}, at::TensorOptions().dtype(dtype).device(device));
  return bias.masked_fill(allowed.logical_not(), lowest_value(dtype));
}

}  // namespace functional

AttentionImpl::AttentionImpl(const ModelConfig& c, const at::TensorOptions& opt)
    : num_heads_(c.num_heads), num_kv_heads_(c.num_kv_heads), head_dim_(c.head_dim) {
  q_proj = register_module("q_proj", Linear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias, opt));
  k_proj = register_module("k_proj", Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, opt));
  v_proj = register_module("v_proj", Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, opt));
  o_proj = register_module("o_proj", Linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias, opt));
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                  const at::Tensor& bias, KvEntry* cache) {
  const int64_t B = x.size(0), T = x.size(1);
  at::Tensor q = q_proj->forward(x).view({B, T, num_heads_, head_dim_}).transpose(1, 2);     // (B, H, T, D)
  at::Tensor k = k_proj->forward(x).view({B, T, num_kv_heads_, head_dim_}).transpose(1, 2);  // (B, KV, T, D)
  at::Tensor v = v_proj->forward(x).view({B, T, num_kv_heads_, head_dim_}).transpose(1, 2);
  q = functional::apply_rope(q, cos, sin);
  k = functional::apply_rope(k, cos, sin);
  if (cache) {
    if (cache->k.defined()) {
      k = at::cat({cache->k, k}, 2);
      v = at::cat({cache->v, v}, 2);
    }
    cache->k = k;
    cache->v = v;
  }
  const int64_t S = k.size(2);  // keys: past + T
  const int64_t groups = num_heads_ / num_kv_heads_;
  at::Tensor out;  // (B, H, T, D)
#if AMAQ_HAVE_SDPA
  if (!bias.defined()) {  // plainly causal, no padding: the flash kernel where there is one
#if AMAQ_SDPA_GQA
    out =
        at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, std::nullopt, /*enable_gqa=*/groups > 1);
    return o_proj->forward(out.transpose(1, 2).reshape({B, T, num_heads_ * head_dim_}));
#endif
  }
#endif
  if (groups > 1) {  // grouped-query attention: each KV head serves `groups` query heads
    k = k.unsqueeze(2).expand({B, num_kv_heads_, groups, S, head_dim_}).reshape({B, num_heads_, S, head_dim_});
    v = v.unsqueeze(2).expand({B, num_kv_heads_, groups, S, head_dim_}).reshape({B, num_heads_, S, head_dim_});
  }
#if AMAQ_HAVE_SDPA
  out = at::scaled_dot_product_attention(q, k, v, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt, 0.0,
                                         /*is_causal=*/!bias.defined());
#else
  TORCH_CHECK(bias.defined(), "attention without scaled_dot_product_attention needs the bias");
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  at::Tensor scores = at::matmul(q, k.transpose(2, 3)) * scale + bias;  // (B, H, T, S)
  at::Tensor probs = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
  out = at::matmul(probs, v);
#endif
  out = out.transpose(1, 2).reshape({B, T, num_heads_ * head_dim_});
  return o_proj->forward(out);
}

MLPImpl::MLPImpl(const ModelConfig& c, const at::TensorOptions& opt) {
  gate_proj = register_module("gate_proj", Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, opt));
  up_proj = register_module("up_proj", Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, opt));
  down_proj = register_module("down_proj", Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, opt));
}

at::Tensor MLPImpl::forward(const at::Tensor& x) {
  return down_proj->forward(at::silu(gate_proj->forward(x)) * up_proj->forward(x));
}

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& c, const at::TensorOptions& opt) {
  self_attn = register_module("self_attn", Attention(c, opt));
  mlp = register_module("mlp", MLP(c, opt));
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, opt));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, opt));
}

at::Tensor DecoderLayerImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                     const at::Tensor& bias, KvEntry* cache) {
  at::Tensor h = x + self_attn->forward(input_layernorm->forward(x), cos, sin, bias, cache);
  return h + mlp->forward(post_attention_layernorm->forward(h));
}

}  // namespace amaq

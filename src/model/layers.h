// Decoder building blocks in HF's arithmetic: RMSNorm, rotary embeddings, GQA attention, SwiGLU,
// and a linear layer that can carry a LoRA adapter.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/version.h>

#include <optional>
#include <string>
#include <vector>

#include "model/config.h"

// at::scaled_dot_product_attention (flash / memory-efficient kernels) came with PyTorch 2.0, its
// grouped-query form (enable_gqa) with 2.5; Debian's 1.13 keeps the explicit softmax(QK^T)V.
#if TORCH_VERSION_MAJOR >= 2
#define AMAQ_HAVE_SDPA 1
#else
#define AMAQ_HAVE_SDPA 0
#endif
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
#define AMAQ_SDPA_GQA 1
#else
#define AMAQ_SDPA_GQA 0
#endif

namespace amaq {

/// While alive on this thread, the base weights of layers and parts built here are not filled (zeros
/// and ones otherwise): for a caller that fills or shares every one of them next, so that the pages
/// of a weight it replaces are never touched. `kAllocated` gives each weight its own storage, to be
/// loaded into; `kPlaceholder` gives it none (one element broadcast to its shape), for a part whose
/// base weights are all shared next: a server part shared by many runs then costs each new run
/// neither a transient second copy of its weights nor the heap fragmentation such a copy leaves.
class UnfilledBaseWeights {
 public:
  enum class Storage { kAllocated, kPlaceholder };
  explicit UnfilledBaseWeights(Storage storage = Storage::kAllocated);
  ~UnfilledBaseWeights();
  UnfilledBaseWeights(const UnfilledBaseWeights&) = delete;
  UnfilledBaseWeights& operator=(const UnfilledBaseWeights&) = delete;
  /// A base weight of shape `sizes`, filled with `value` unless a scope above is alive.
  static at::Tensor make(at::IntArrayRef sizes, double value, const at::TensorOptions& opt);

 private:
  std::optional<Storage> outer_;
};

/// LoRA hyper-parameters (PEFT's names in comments).
struct LoRAOptions {
  explicit LoRAOptions(int64_t rank) : rank_(rank) {}
  /// rank r (`r`); required.
  LoRAOptions& rank(int64_t v) {
    rank_ = v;
    return *this;
  }
  /// scale numerator (`lora_alpha`); default 16.
  LoRAOptions& alpha(double v) {
    alpha_ = v;
    return *this;
  }
  /// dropout on the adapter's input (`lora_dropout`); default 0.
  LoRAOptions& dropout(double v) {
    dropout_ = v;
    return *this;
  }
  /// scale alpha / sqrt(r) instead of alpha / r (`use_rslora`); default false.
  LoRAOptions& rslora(bool v) {
    rslora_ = v;
    return *this;
  }
  int64_t rank() const { return rank_; }
  double alpha() const { return alpha_; }
  double dropout() const { return dropout_; }
  bool rslora() const { return rslora_; }
  double scale() const;

 private:
  int64_t rank_;
  double alpha_ = 16.0;
  double dropout_ = 0.0;
  bool rslora_ = false;
};

/// y = x W^T + b, plus (dropout(x) A^T B^T) * scale when a LoRA adapter is attached.
/// Parameters: `weight` (out, in), `bias` (out), `lora_A` (r, in), `lora_B` (out, r). `opt` gives the
/// base weights' dtype and device. Mixed precision as PEFT + autocast: over bf16/fp16 base weights
/// the LoRA weights are kept in fp32 (what AdamW updates) and cast to the compute dtype for the
/// product; over fp32 or fp64 they have the weights' dtype.
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, const at::TensorOptions& opt);
  at::Tensor forward(const at::Tensor& x);  // (..., in) -> (..., out)
  /// Attaches a LoRA adapter: lora_A Kaiming-uniform (a = sqrt(5)), lora_B zero, as PEFT does.
  void add_lora(const LoRAOptions& opt);
  bool has_lora() const { return lora_a.defined(); }
  const LoRAOptions& lora_options() const { return lora_opt_; }

  at::Tensor weight, bias, lora_a, lora_b;

 private:
  LoRAOptions lora_opt_{0};
};
TORCH_MODULE(Linear);

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, const at::TensorOptions& opt);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

namespace functional {
/// Inverse frequencies (head_dim / 2,) for the configured rope type, in fp32 as HF computes them.
at::Tensor rope_inv_freq(const RopeConfig& rope, int64_t head_dim);
/// cos and sin tables (T, head_dim) for positions 0..T-1.
std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& inv_freq, int64_t T, at::ScalarType dtype,
                                              at::Device device);
/// x * cos + rotate_half(x) * sin, x (B, H, T, D).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
/// Additive attention bias (B, 1, T, T): 0 where query i may see key j (j <= i, inside the window,
/// key not padding), the dtype's lowest value elsewhere. `attention_mask` (B, T) of 0/1 or undefined.
at::Tensor attention_bias(const at::Tensor& attention_mask, int64_t B, int64_t T, int64_t window, at::ScalarType dtype,
                          at::Device device);
}  // namespace functional

/// One layer's cached keys and values (B, KV heads, past, D), rotary already applied.
struct KvEntry {
  at::Tensor k, v;
};

class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const ModelConfig& c, const at::TensorOptions& opt);
  /// x (B, T, C), cos/sin (T, D) for the new positions, bias (B, 1, T, past + T) -> (B, T, C).
  /// With `cache`, the new keys and values are appended to it and attention covers all of it.
  /// An undefined bias means plainly causal (no padding, no window, no cache): only where
  /// AMAQ_HAVE_SDPA, which then runs its causal kernel.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& bias,
                     KvEntry* cache = nullptr);
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
};
TORCH_MODULE(Attention);

class MLPImpl : public torch::nn::Module {
 public:
  MLPImpl(const ModelConfig& c, const at::TensorOptions& opt);
  at::Tensor forward(const at::Tensor& x);  // down(silu(gate(x)) * up(x))
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(MLP);

class DecoderLayerImpl : public torch::nn::Module {
 public:
  DecoderLayerImpl(const ModelConfig& c, const at::TensorOptions& opt);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& bias,
                     KvEntry* cache = nullptr);
  Attention self_attn{nullptr};
  MLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(DecoderLayer);

}  // namespace amaq

// A contiguous slice of a decoder-only LM. The split puts layers [0, k) with the embeddings on the
// client and layers [k, L) with the final norm and LM head on the server; the unsplit model is the
// slice [0, L). Each slice loads only its own tensors from the checkpoint.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <map>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "model/config.h"
#include "model/layers.h"

namespace amaq {

class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t vocab, int64_t dim, const at::TensorOptions& opt);
  at::Tensor forward(const at::Tensor& ids);  // (B, T) int64 -> (B, T, C)
  at::Tensor weight;                          // (V, C)
};
TORCH_MODULE(Embedding);

class DecoderPartImpl : public torch::nn::Module {
 public:
  /// Layers [layer_begin, layer_end); the embeddings come with layer_begin == 0, the final norm and
  /// LM head with layer_end == L unless `head` is false (a U-shaped split's middle ending at L).
  /// `opt`: the base weights' dtype (the compute dtype) and device.
  DecoderPartImpl(const ModelConfig& config, int64_t layer_begin, int64_t layer_end,
                  const at::TensorOptions& opt = at::kFloat, bool head = true);

  /// input: token ids (B, T) if has_embedding(), else the hidden state (B, T, C) from the part before,
  /// on any device (moved to this part's).
  /// Returns logits (B, T, V) if has_head(), else the hidden state (B, T, C) for the part after.
  /// attention_mask (B, T) of 0/1 marks padding (may be undefined). When `hidden` is given, HF's
  /// output_hidden_states entries this part produces are stored under their global index.
  at::Tensor forward(const at::Tensor& input, const at::Tensor& attention_mask = {},
                     std::map<int64_t, at::Tensor>* hidden = nullptr);

  /// Incremental forward for generation: `input` holds the new positions only (no padding); keys
  /// and values of earlier calls come from `cache`, which grows by T. Same result, position for
  /// position, as forward() on the whole sequence.
  at::Tensor forward_cached(const at::Tensor& input, std::vector<KvEntry>* cache);

  bool has_embedding() const { return layer_begin_ == 0; }
  bool has_head() const { return head_; }
  int64_t layer_begin() const { return layer_begin_; }
  int64_t layer_end() const { return layer_end_; }
  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }

  /// (checkpoint tensor name, parameter) for every base weight this part holds.
  std::vector<std::pair<std::string, at::Tensor>> base_weights();
  /// Copies this part's weights, and only those, from the checkpoint.
  void load_weights(const CheckpointReader& ckpt);
  /// Points every base weight at the tensor of the same checkpoint name in `weights` (same dtype,
  /// device and shape): parts of many runs share one read-only copy of the frozen weights. Their
  /// own memory is freed. Throws amaq::Error naming a weight that is missing or differs.
  void share_base_weights(const std::map<std::string, at::Tensor>& weights);
  /// (HF module name such as "model.layers.3.mlp.up_proj", layer) for every linear layer.
  std::vector<std::pair<std::string, Linear>> linears();
  /// Makes every base weight trainable (full fine-tuning) or frozen. With tied embeddings split
  /// across two sides, each side trains its own copy (the unsplit model shares one; within one side,
  /// tie_head_to).
  void set_base_trainable(bool trainable);
  /// Ties this part's head (it holds no embedding) to `embed_weight`, another part's embedding
  /// matrix: the tensor itself, not a copy, so that full fine-tuning trains the one matrix a tied
  /// model has (the U-shaped client: [0, K) with the embedding and [M, L) with the head). The part's
  /// own head is dropped; base_weights() no longer lists it.
  void tie_head_to(const at::Tensor& embed_weight);
  /// Activation checkpointing: while gradients are on, each decoder layer keeps only its input and
  /// runs again in backward (less memory for long sequences, about one more forward of time).
  /// Refused when a LoRA layer has dropout; call after the adapters are attached.
  void set_activation_checkpointing(bool on);
  bool activation_checkpointing() const { return checkpointing_; }
  /// Parameters with requires_grad, each once.
  std::vector<at::Tensor> trainable_parameters();

  Embedding embed_tokens{nullptr};
  std::vector<DecoderLayer> layers;
  RMSNorm norm{nullptr};
  Linear lm_head{nullptr};  // absent when the head is tied to embed_tokens held by this same part

 private:
  ModelConfig config_;
  int64_t layer_begin_, layer_end_;
  bool head_;
  at::ScalarType dtype_;
  at::Device device_;
  at::Tensor inv_freq_;  // (head_dim / 2,) on device_
  bool checkpointing_ = false;
  at::Tensor tied_head_;                   // tie_head_to's matrix
  at::Tensor logits(const at::Tensor& h);  // the head of the normed hidden state
};
TORCH_MODULE(DecoderPart);

/// Embeddings + layers [0, k). Refuses k outside [1, L).
DecoderPart client_part(const ModelConfig& config, int64_t split, const at::TensorOptions& opt = at::kFloat);
/// Layers [k, L) + final norm + LM head. Refuses k outside [1, L).
DecoderPart server_part(const ModelConfig& config, int64_t split, const at::TensorOptions& opt = at::kFloat);
/// U-shaped split (the client keeps the loss): checks 1 <= split < tail_split <= L, naming the bound.
void check_tail_split(const ModelConfig& config, int64_t split, int64_t tail_split);
/// The server's layers [k, m) of a U-shaped split: neither embeddings nor head.
DecoderPart middle_part(const ModelConfig& config, int64_t split, int64_t tail_split,
                        const at::TensorOptions& opt = at::kFloat);
/// The client's tail of a U-shaped split: layers [m, L) + final norm + LM head (m = L: only those).
DecoderPart tail_part(const ModelConfig& config, int64_t split, int64_t tail_split,
                      const at::TensorOptions& opt = at::kFloat);
/// The unsplit model.
DecoderPart full_model(const ModelConfig& config, const at::TensorOptions& opt = at::kFloat);

/// SHA-256 of the config and every checkpoint tensor's name, dtype and shape (headers only, no
/// weights read): two sides with the same fingerprint run the same model.
std::string model_fingerprint(const ModelConfig& config, const CheckpointReader& ckpt);

/// Checks config.json against the checkpoint's tensor shapes before anything is allocated: the
/// embedding is (vocab_size, hidden_size) and the decoder layers are exactly [0, num_hidden_layers).
/// Throws amaq::Error naming the field and what the weights say.
void check_config_matches_weights(const ModelConfig& config, const CheckpointReader& ckpt);

/// Mean next-token cross-entropy, labels shifted inside as HF does; label -100 is ignored.
/// logits (B, T, V), labels (B, T) int64 on any device.
at::Tensor causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels);

/// Attaches LoRA to every linear layer whose module name matches `targets` (PEFT's rules: a name
/// equal to the last component or the whole name; "all-linear" = every linear but lm_head).
/// Returns the number of layers adapted.
int64_t apply_lora(DecoderPart& part, const LoRAOptions& opt, const std::vector<std::string>& targets);
bool lora_target_matches(const std::string& module_name, const std::vector<std::string>& targets);

}  // namespace amaq

// One side of a split run: its slice of the model, what it trains (LoRA or full weights) and its
// AdamW. The client and the server both hold one; the unsplit reference in tests builds the same.
#pragma once
#include <ATen/ATen.h>
#include <torch/optim/adamw.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/part.h"
#include "train/options.h"

namespace amaq::train {

enum class SideRole { kClient, kServer };

struct Side {
  DecoderPart part{nullptr};
  /// U-shaped split, client: layers [tail_split, L) with the head and the loss (else null). One AdamW
  /// steps both parts, as the unsplit model's one AdamW steps all its parameters.
  DecoderPart tail{nullptr};
  SideOptions options;
  std::unique_ptr<torch::optim::AdamW> opt;

  /// Loads this side's base weights, attaches LoRA (from options.init_adapter, or freshly drawn
  /// after seeding the generator with `seed`) or unfreezes the weights (full), and makes AdamW.
  /// With `shared_base` (the part's frozen weights by checkpoint name, on the side's device and in its
  /// dtype) a LoRA side points at those instead of loading its own; a full side still loads its own.
  /// With `tail_split` m > 0 (U-shaped split) the server holds layers [split, m) and the client also
  /// the tail [m, L).
  static Side build(const ModelConfig& config, const CheckpointReader& ckpt, SideRole role, int64_t split,
                    const SideOptions& options, uint64_t seed, double weight_decay,
                    const std::map<std::string, at::Tensor>* shared_base = nullptr, int64_t tail_split = 0);
  /// The same around parts whose base weights are already in place (benchmarks draw them).
  static Side around(DecoderPart part, const SideOptions& options, uint64_t seed, double weight_decay,
                     DecoderPart tail = nullptr);
  /// The part, then the tail when there is one.
  std::vector<DecoderPart> parts() const;

  at::Device device() const { return part->device(); }

  /// What this side trains: LoRA tensors under PEFT keys, or base weights under checkpoint names;
  /// on the CPU (copies when the side computes elsewhere).
  NamedTensors state();
  /// The tensors state() copies, themselves (on the side's device).
  NamedTensors trained();
  /// Restores state(); every tensor must be present with its shape. `what` names the source.
  void load_state(const std::map<std::string, at::Tensor>& tensors, const std::string& what);
  /// Squared L2 norm of the gradients accumulated so far.
  double grad_sq_norm() const;
  /// Multiplies the gradients by `coef` (clipping), sets the learning rate and steps.
  void step(double lr, double coef);
  void zero_grad();

 private:
  bool fused_step(double coef);
  // The fused CUDA AdamW's step counts (fp32 scalars on the device) and their host mirror.
  std::vector<at::Tensor> fused_steps_;
  std::vector<int64_t> fused_steps_host_;
};

/// What a side built with `options` owns beyond shared frozen weights, estimated before it is built
/// (no weight is read or touched): the tensors it trains and their gradients (LoRA in fp32, a full
/// side's own copy of the base weights in the compute dtype) and AdamW's two fp32 moments of each.
uint64_t owned_bytes_estimate(const ModelConfig& config, SideRole role, int64_t split, const SideOptions& options,
                              int64_t tail_split = 0);

/// The parts a side of this role holds (placeholders or allocated as UnfilledBaseWeights says):
/// client [0, split) (+ tail [tail_split, L)), server [split, L) or [split, tail_split).
std::vector<DecoderPart> side_parts(const ModelConfig& config, SideRole role, int64_t split, int64_t tail_split,
                                    const at::TensorOptions& where);

/// Refuses SideOptions::cuda_graph where a step cannot be captured (on the CPU, with LoRA dropout or
/// activation checkpointing), naming the cause.
void check_cuda_graph(const SideOptions& options, at::Device device);

/// SideOptions::cuda_graph on the side that starts from a hidden state (the server): a micro-batch's
/// forward, loss and backward captured as a CUDA graph once per input shape, then replayed, so that
/// the host launches one graph instead of every kernel. It computes what the eager micro-batch
/// computes: the capture's warm-up runs leave no trace in the gradients, and a padded batch takes the
/// same attention path as it does eagerly. The side's gradients stay allocated (zero_grad zeroes them
/// in place) because the graph accumulates into them.
class GraphedBackward {
 public:
  /// Forward of h (B, T, C) with mask (B, T) on the CPU or undefined, loss against labels (B, T) on
  /// the side's device, backward of loss / micro_batches. Returns the loss (a device scalar) and sets
  /// *h_grad to a copy of h's gradient.
  at::Tensor run(Side& side, const at::Tensor& h, const at::Tensor& mask, const at::Tensor& labels,
                 int64_t micro_batches, at::Tensor* h_grad);

 private:
  std::vector<int64_t> key_;
  at::Tensor h_, mask_, labels_, loss_;
  std::unique_ptr<GraphedStep> graph_;
};

/// Clip coefficient as torch.nn.utils.clip_grad_norm_ computes it (1 when off or under the limit).
double clip_coefficient(double total_sq_norm, double max_norm);

}  // namespace amaq::train

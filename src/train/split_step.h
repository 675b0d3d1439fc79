// One step of split training, each side over its Channel (DESIGN.md "What happens in one training
// step"): the client runs its layers, sends the compressed activations with labels and mask, and
// on the compressed gradient's return back-propagates through the same rounding (fake-quant, AMAQ
// gates included) and updates; the server decodes exactly what the client's graph used, finishes
// the forward, takes the loss, returns the compressed gradient and updates.
#pragma once
#include <ATen/ATen.h>
#include <torch/optim/adamw.h>

#include <memory>
#include <vector>

#include "model/part.h"
#include "quant/amaq.h"
#include "quant/codec.h"
#include "wire/channel.h"

namespace amaq::train {

struct OptimOptions {
  double lr = 1e-3;            ///< LoRA / weights
  double weight_decay = 0.0;
  double gate_lr = 0.05;       ///< AMAQ gates (their own parameter group)
};

struct StepStats {
  double loss = 0;          ///< the server's task loss
  double reg_loss = 0;      ///< AMAQ bit regularizer (client)
  uint64_t fwd_bytes = 0;   ///< FORWARD frame, header included
  uint64_t bwd_bytes = 0;   ///< BACKWARD frame, header included
  double fwd_bits = 0;      ///< mean bit-width of the forward map (nominal for fixed/none)
};

class ClientSide {
 public:
  ClientSide(DecoderPart part, const quant::CodecSpec& fwd, const quant::CodecSpec& bwd, wire::Channel& channel,
             OptimOptions opt);
  /// ids, labels (B, T) int64; mask (B, T) 0/1 or undefined; sample_ids for AQ-SGD (else empty).
  wire::Status step(uint64_t step, const at::Tensor& ids, const at::Tensor& labels, const at::Tensor& mask,
                    const std::vector<int64_t>& sample_ids, StepStats* stats);
  quant::AmaqGates gates() const { return gates_; }

 private:
  DecoderPart part_;
  quant::Codec fwd_, bwd_;
  quant::AmaqGates gates_{nullptr};
  wire::Channel& channel_;
  std::unique_ptr<torch::optim::AdamW> opt_, gate_opt_;
};

class ServerSide {
 public:
  ServerSide(DecoderPart part, const quant::CodecSpec& fwd, const quant::CodecSpec& bwd, wire::Channel& channel,
             OptimOptions opt);
  /// Serves one FORWARD. A malformed message is answered with ERROR and returned.
  wire::Status serve(std::chrono::milliseconds idle_timeout, StepStats* stats = nullptr);

 private:
  DecoderPart part_;
  quant::Codec fwd_, bwd_;
  wire::Channel& channel_;
  std::unique_ptr<torch::optim::AdamW> opt_;
};

}  // namespace amaq::train

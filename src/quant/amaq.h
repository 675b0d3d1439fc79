// AMAQ (arXiv 2510.05468): a learnable gate per channel sets that channel's bit-width,
//   bits_c = b_min + (b_max - b_min) * sigmoid(alpha * q_c),
// a regularizer mean_c sigmoid(alpha * q_c)^2 pulls bits down, and the task loss, reaching the
// gates through the quantizer's step size, holds up the channels it needs. See docs/amaq.md.
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "quant/codec.h"
#include "quant/spec.h"

namespace amaq::quant {

class AmaqGatesImpl : public torch::nn::Module {
 public:
  AmaqGatesImpl(int64_t channels, const CodecSpec& spec);

  /// (C,) differentiable continuous bit-widths.
  at::Tensor bits_continuous() const;
  /// (C,) uint8 bit-widths sent on the wire: round(bits_continuous), in [b_min, b_max].
  at::Tensor bit_map() const;
  /// The paper's Bits_Loss = mean_c sigmoid(alpha q_c)^2 (differentiable scalar).
  at::Tensor regularization() const;
  /// The budget in force at `step`: walks linearly from bits_init down to spec.budget over decay_steps.
  double budget_at(int64_t step) const;
  /// The regularizer's weight at `step`: beta, or 0 in stop/guaranteed mode while the mean bit-width
  /// is already within the budget.
  double beta_at(int64_t step) const;
  /// Shifts every gate by one common offset (keeping the channels' ranking) so that the mean of
  /// bit_map() is at most `budget`. A no-op when it already is. Returns the mean after.
  double project(double budget);

  at::Tensor gates;  // (C,)
  const CodecSpec& spec() const { return spec_; }
  /// budget=auto: the budget the schedule walks to from here on.
  void set_budget(double budget) { spec_.budget = budget; }

 private:
  CodecSpec spec_;
};
TORCH_MODULE(AmaqGates);

/// The budget an amaq spec sets at `step`: bits_init walking linearly to spec.budget over
/// decay_steps (the forward gates' schedule; the server's backward map follows it too).
double budget_at(const CodecSpec& spec, int64_t step);

/// The value decode(encode(x)) in the autograd graph (x's own values where `encoded` has no decoded
/// copy: a sender whose peer decodes the packet needs only the gradients below). dy/dx is the
/// identity (straight-through);
/// when `bits_continuous` (C,) is given, it receives the LSQ-style gradient
///   dL/db_c = sum over channel c of dL/dy * (code - u) * dstep/db,  u = (x - lo) / step,
/// i.e. how the loss changes when the channel's step shrinks with one more bit.
at::Tensor fake_quant(const at::Tensor& x, const Encoded& encoded, const at::Tensor& bits_continuous = {});

/// The backward (gradient) map from the forward one: the forward ranking shifted by one common
/// offset to the largest mean <= `budget`, clamped to [bits_min, bits_max]. See docs/amaq.md.
at::Tensor shift_bit_map(const at::Tensor& forward_map, double budget, int bits_min, int bits_max);

}  // namespace amaq::quant

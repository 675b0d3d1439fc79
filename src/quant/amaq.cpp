#include "quant/amaq.h"

#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

#include "quant/affine.h"
#include "quant/rotation.h"

namespace amaq::quant {

AmaqGatesImpl::AmaqGatesImpl(int64_t channels, const CodecSpec& spec) : spec_(spec) {
  TORCH_CHECK(spec.codec == CodecId::kAmaq, "AMAQ gates need an amaq codec spec");
  // Start every channel at bits_init; keep sigmoid away from saturation so the gates can move.
  double p = (spec.bits_init - spec.bits_min) / std::max(1e-9, double(spec.bits_max - spec.bits_min));
  p = std::min(std::max(p, 0.05), 0.95);
  const double q0 = std::log(p / (1 - p)) / spec.alpha;
  gates = register_parameter("gates", at::full({channels}, q0, at::kFloat));
}

at::Tensor AmaqGatesImpl::bits_continuous() const {
  return spec_.bits_min + (spec_.bits_max - spec_.bits_min) * at::sigmoid(gates * spec_.alpha);
}

at::Tensor AmaqGatesImpl::bit_map() const {
  at::NoGradGuard no_grad;
  return bits_continuous().round().clamp(spec_.bits_min, spec_.bits_max).to(at::kByte).to(at::kCPU).contiguous();
}

at::Tensor AmaqGatesImpl::regularization() const {
  return at::sigmoid(gates * spec_.alpha).pow(2).mean();
}

double budget_at(const CodecSpec& spec, int64_t step) {
  if (spec.decay_steps <= 0 || step >= spec.decay_steps) return spec.budget;
  const double t = static_cast<double>(step) / static_cast<double>(spec.decay_steps);
  return spec.bits_init + (spec.budget - spec.bits_init) * t;
}

double AmaqGatesImpl::budget_at(int64_t step) const {
  return quant::budget_at(spec_, step);
}

double AmaqGatesImpl::beta_at(int64_t step) const {
  if (spec_.mode == BudgetMode::kPenalty) return spec_.beta;
  return mean_bits(bit_map()) > budget_at(step) ? spec_.beta : 0.0;
}

double AmaqGatesImpl::project(double budget) {
  at::NoGradGuard no_grad;
  auto mean_after = [&](double tau) {
    at::Tensor b =
        (spec_.bits_min + (spec_.bits_max - spec_.bits_min) * at::sigmoid((gates - tau) * spec_.alpha)).round();
    return b.clamp(spec_.bits_min, spec_.bits_max).to(at::kDouble).mean().item<double>();
  };
  if (mean_after(0) <= budget) return mean_after(0);
  // Bisection on the common shift: mean_after is non-increasing in tau.
  double lo = 0, hi = 1;
  while (mean_after(hi) > budget && hi < 1e6) hi *= 2;
  for (int i = 0; i < 60; ++i) {
    double mid = 0.5 * (lo + hi);
    (mean_after(mid) > budget ? lo : hi) = mid;
  }
  gates.sub_(hi);
  return mean_after(0);
}

namespace {

struct FakeQuantFn : public torch::autograd::Function<FakeQuantFn> {
  // x (..., C); decoded: its quantized value; residual_dstep (rows, C): (code - u) * dstep/db.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bits,
                            const at::Tensor& decoded, const at::Tensor& residual_dstep, int64_t rotation_block) {
    ctx->save_for_backward({residual_dstep});
    ctx->saved_data["rotation_block"] = rotation_block;
    ctx->saved_data["has_bits"] = bits.numel() > 0;
    ctx->saved_data["bits_on_cuda"] = bits.is_cuda();  // the gates may live apart from x
    // Returned as it is: autograd makes an input it is given back a view of it (no copy).
    return decoded;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor& dy = grads[0];
    at::Tensor dbits;
    if (ctx->saved_data["has_bits"].toBool()) {
      at::Tensor rd = ctx->get_saved_variables()[0];
      // With rot=hadamard the widths are of rotated coordinates: so is the gradient they meet
      // (the rotation is orthonormal and symmetric).
      const int64_t block = ctx->saved_data["rotation_block"].toInt();
      at::Tensor g = dy.reshape(rd.sizes()).to(at::kFloat);
      if (block > 0) g = block_hadamard(g, block);
      dbits = g.is_cpu() ? column_dots(g, rd) : (g * rd).sum(0);
      if (!ctx->saved_data["bits_on_cuda"].toBool()) dbits = dbits.to(at::kCPU);
    }
    return {dy, dbits, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

namespace {

// Each element's range start and step (rows, C) fp32 on `device`, from the per-group ranges: the
// same values affine_lo_step gives, built with tensor ops where the encoding ran (the fused CUDA
// encoder leaves no codes on the host).
std::pair<at::Tensor, at::Tensor> lo_step_on(const Encoded& e, at::Device device) {
  const AffineLayout& L = e.layout;
  const auto on = at::TensorOptions().device(device);
  // fp16 -> fp32 is exact; times the scale in fp32, as decoded_ranges computes it.
  at::Tensor lo = (e.quant.lo.to(at::kFloat) * e.quant.scale).to(device),
             hi = (e.quant.hi.to(at::kFloat) * e.quant.scale).to(device);
  at::Tensor cols = at::arange(L.cols, on.dtype(at::kLong));
  switch (L.granularity) {
    case Granularity::kToken:
      lo = lo.view({L.rows, 1}), hi = hi.view({L.rows, 1});
      break;
    case Granularity::kChannel:
      lo = lo.view({1, L.cols}), hi = hi.view({1, L.cols});
      break;
    case Granularity::kGroup: {
      at::Tensor g = at::div(cols, L.group, "floor");
      lo = lo.view({L.rows, L.groups_per_row()}).index_select(1, g);
      hi = hi.view({L.rows, L.groups_per_row()}).index_select(1, g);
      break;
    }
  }
  at::Tensor qmax = (at::pow(2.0, e.bits.to(device, at::kFloat)) - 1).view({1, L.cols});
  return {lo.expand({L.rows, L.cols}), ((hi - lo) / qmax).expand({L.rows, L.cols})};
}

}  // namespace

at::Tensor fake_quant(const at::Tensor& x, const Encoded& e, const at::Tensor& bits_continuous) {
  // Without a decoded copy the value is x itself: the gradients need none of its numbers.
  at::Tensor decoded = e.decoded.defined() ? e.decoded.to(x.device()).to(x.scalar_type()) : x;
  at::Tensor residual_dstep;
  if (bits_continuous.defined() && e.gate_slope.defined()) {
    residual_dstep = e.gate_slope.to(x.device());  // the encoder's, computed while x was in cache
  } else if (bits_continuous.defined()) {
    TORCH_CHECK(e.quant.lo.defined(), "bit-width gradients need an affine (fixed/amaq) encoding");
    // With the codes on the host (CPU encoders) they are used as they are; without (the fused CUDA
    // encoder), they are recomputed where x is, by round-to-nearest-even as quantize_one does it.
    const bool have_codes = e.quant.codes.defined();
    const at::Device where = have_codes ? at::Device(at::kCPU) : x.device();
    auto [lo, step] = have_codes ? affine_lo_step(e.quant, e.bits, e.layout) : lo_step_on(e, where);  // (rows, C)
    at::Tensor xf = x.detach().to(where, at::kFloat).reshape({e.layout.rows, e.layout.cols});
    if (e.rotation_block > 0) xf = block_hadamard(xf, e.rotation_block);  // what was quantized
    at::Tensor safe = at::where(step > 0, step, at::ones_like(step));
    at::Tensor u = (xf - lo) / safe;
    at::Tensor codes;
    if (have_codes) {
      codes = e.quant.codes.to(at::kFloat);
    } else {
      const at::Tensor qmax = at::pow(2.0, e.bits.to(where, at::kFloat)) - 1;  // (C,)
      codes = at::round(at::minimum(at::clamp_min(u, 0.0), qmax));
    }
    at::Tensor residual = at::where(step > 0, codes - u, at::zeros_like(u));
    at::Tensor pow2 = at::pow(2.0, e.bits.to(where, at::kFloat));     // (C,)
    at::Tensor dstep_db = -step * std::log(2.0) * pow2 / (pow2 - 1);  // (rows, C)
    residual_dstep = (residual * dstep_db).to(x.device());
  }
  // Custom functions take no undefined inputs: without gates, an empty placeholder stands in.
  const at::Tensor bits = bits_continuous.defined() ? bits_continuous : at::empty({0});
  return FakeQuantFn::apply(x, bits, decoded, residual_dstep.defined() ? residual_dstep : at::empty({0}),
                            e.rotation_block);
}

at::Tensor shift_bit_map(const at::Tensor& forward_map, double budget, int bits_min, int bits_max) {
  at::Tensor f = forward_map.to(at::kDouble);
  auto shifted = [&](double tau) { return (f + tau).round().clamp(bits_min, bits_max); };
  double lo = -16, hi = 16;  // mean(shifted(tau)) is non-decreasing in tau
  if (shifted(lo).mean().item<double>() > budget) return shifted(lo).to(at::kByte);
  for (int i = 0; i < 60; ++i) {
    double mid = 0.5 * (lo + hi);
    (shifted(mid).mean().item<double>() <= budget ? lo : hi) = mid;
  }
  return shifted(lo).to(at::kByte).contiguous();
}

}  // namespace amaq::quant

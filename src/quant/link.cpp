#include "quant/link.h"

#include <torch/csrc/autograd/autograd.h>

#include "core/error.h"
#include "core/torch_io.h"

namespace amaq::quant {
namespace {

// Gradients back for a forward codec that keeps per-sample memory (AQ-SGD) are quantized directly,
// no delta (Wang et al.), at the spec's bits, per token; AQ-SGD runs evaluate through the same.
CodecSpec direct_spec(const CodecSpec& spec) {
  CodecSpec d;
  d.codec = CodecId::kFixed;
  d.bits = spec.bits;
  d.granularity = Granularity::kToken;
  return d;
}

// The seed of stochastic rounding for micro-batch `micro` of step `step` (both directions).
uint64_t rounding_seed(int64_t step, int64_t micro) {
  return static_cast<uint64_t>(step * 1000003 + micro);
}

// What a codec needs of its link: per-sample memory (AQ-SGD), widths from a learned map (AMAQ).
// No default: a new codec must say (-Wswitch).
struct Traits {
  bool keeps_memory = false, learns_map = false;
};
Traits traits(const CodecSpec& s) {
  switch (s.codec) {
    case CodecId::kNone:
    case CodecId::kFixed:
    case CodecId::kEcsq:
      return {};
    case CodecId::kAmaq:
      return {false, true};
    case CodecId::kAqsgd:
      return {true, false};
  }
  return {};
}
bool keeps_memory(const CodecSpec& s) {
  return traits(s).keeps_memory;
}
bool learns_map(const CodecSpec& s) {
  return traits(s).learns_map;
}

constexpr const char* kGatesTensor = "amaq.gates";
constexpr const char* kGateOptimFile = "gate_optim.pt";
constexpr const char* kMemoryPrefix = "aqsgd/";

}  // namespace

void Link::validate(const CodecSpec& fwd, const CodecSpec& bwd) {
  if (learns_map(bwd) && !learns_map(fwd)) {
    throw Error("an amaq backward codec needs an amaq forward codec",
                "the gradient map is the forward map shifted to its budget");
  }
}

Link::Link(LinkSide side, const CodecSpec& fwd, const CodecSpec& bwd, int64_t channels, double gate_lr)
    : side_(side), fwd_spec_(fwd), bwd_spec_(keeps_memory(bwd) ? direct_spec(bwd) : bwd) {
  validate(fwd, bwd);
  fwd_ = std::make_unique<Codec>(fwd_spec_);
  bwd_ = std::make_unique<Codec>(bwd_spec_);
  if (keeps_memory(fwd_spec_)) eval_ = std::make_unique<Codec>(direct_spec(fwd_spec_));
  if (side_ == LinkSide::kClient && learns_map(fwd_spec_)) {
    gates_ = AmaqGates(channels, fwd_spec_);
    gate_opt_ = std::make_unique<torch::optim::AdamW>(std::vector<at::Tensor>{gates_->gates},
                                                      torch::optim::AdamWOptions(gate_lr).weight_decay(0));
  }
  if (side_ == LinkSide::kServer && learns_map(bwd_spec_)) bwd_budget_ = budget_at(bwd_spec_, 0);
}

Link::~Link() = default;

bool Link::needs_sample_ids() const {
  return keeps_memory(fwd_spec_);
}

BitsStats Link::stats_of(const at::Tensor& map, double nominal) const {
  if (!map.defined() || map.numel() == 0) return {nominal, nominal, nominal};
  at::Tensor m = map.to(at::kDouble);
  return {m.mean().item<double>(), m.min().item<double>(), m.max().item<double>()};
}

std::optional<double> Link::backward_budget_to_sync(int64_t step) {
  if (!learns_map(bwd_spec_)) return std::nullopt;
  const double b = budget_at(bwd_spec_, step);
  if (b == bwd_budget_) return std::nullopt;
  bwd_budget_ = b;
  return b;
}

void Link::follow_backward_schedule(int64_t step) {
  if (!learns_map(bwd_spec_)) return;
  const double b = budget_at(bwd_spec_, step);
  if (b != bwd_budget_) set_backward_budget(b);
}

void Link::begin_step() {
  if (gate_opt_) gate_opt_->zero_grad();
}

SentActivations Link::send_activations(const at::Tensor& h, int64_t step, int64_t micro,
                                       const std::vector<int64_t>& sample_ids) {
  EncodeArgs args;
  args.sample_ids = sample_ids;
  args.seed = rounding_seed(step, micro);
  if (gates_) args.bits = gates_->bit_map();
  // The gates' gradient needs each element's code: fake_quant recomputes them on the GPU by
  // round-to-nearest; stochastic rounding's codes exist only inside the fused CUDA encoder, so with
  // it a CUDA activation is encoded on the CPU (the same packet; slower).
  const bool host = gates_ && h.is_cuda() && fwd_spec_.rounding != Rounding::kNearest;
  args.want_decoded = false;  // the peer decodes the packet; the gates' gradient needs no decoded copy
  args.want_gate_slope = static_cast<bool>(gates_);
  Encoded e = fwd_->encode(host ? h.detach().to(at::kCPU) : h, args);
  SentActivations out;
  out.value = gates_ ? fake_quant(h, e, gates_->bits_continuous()) : h;
  out.bits = stats_of(e.bits, fwd_spec_.nominal_bits());
  out.packet = std::move(e.packet);
  return out;
}

at::Tensor Link::receive_gradients(std::string_view packet, BitsStats* bits, at::Device device, int64_t max_elements) {
  at::Tensor dh = bwd_->decode(packet, device, max_elements);
  if (bits) *bits = stats_of(learns_map(bwd_spec_) ? bwd_->received_map() : at::Tensor(), bwd_spec_.nominal_bits());
  return dh;
}

void Link::backward(const at::Tensor& value, const at::Tensor& dh, int64_t step, int64_t micro_batches,
                    double* reg_value) {
  std::vector<at::Tensor> roots{value}, grads{dh.to(value.scalar_type())};
  at::Tensor reg = regularizer(step, micro_batches, reg_value);
  if (reg.defined()) {
    roots.push_back(reg);
    grads.push_back(at::ones_like(reg));
  }
  torch::autograd::backward(roots, grads);
}

at::Tensor Link::regularizer(int64_t step, int64_t micro_batches, double* value) {
  if (!gates_) {
    if (value) *value = 0;
    return {};
  }
  at::Tensor r = gates_->regularization();
  if (value) *value = r.item<double>();
  return gates_->beta_at(step) / static_cast<double>(micro_batches) * r;
}

double Link::regularizer_weight() const {
  return gates_ ? gates_->spec().beta : 0.0;
}

void Link::end_step(int64_t step) {
  if (!gate_opt_) return;
  gate_opt_->step();
  if (gates_->spec().mode == BudgetMode::kGuaranteed) gates_->project(gates_->budget_at(step));
}

std::string Link::encode_eval(const at::Tensor& h) {
  EncodeArgs args;
  args.want_decoded = false;
  if (gates_) args.bits = gates_->bit_map();
  return eval_codec().encode(h, args).packet;
}

std::vector<int64_t> Link::learned_map() const {
  if (!gates_) return {};
  const at::Tensor m = gates_->bit_map().to(at::kLong).contiguous();
  return {m.data_ptr<int64_t>(), m.data_ptr<int64_t>() + m.numel()};
}

void Link::set_auto_budgets(double fwd, double bwd) {
  if (fwd_spec_.auto_budget && gates_) {
    fwd_spec_.budget = fwd;
    gates_->set_budget(fwd);
  }
  if (bwd_spec_.auto_budget) bwd_spec_.budget = bwd;
}

double Link::forward_target() const {
  return learns_map(fwd_spec_) ? fwd_spec_.budget : 0.0;
}

double Link::backward_target() const {
  return learns_map(bwd_spec_) ? bwd_spec_.budget : 0.0;
}

void Link::set_backward_budget(double budget) {
  bwd_budget_ = budget, bwd_map_step_ = -1;
}

at::Tensor Link::receive_activations(std::string_view packet, at::Device device, int64_t max_elements,
                                     BitsStats* bits) {
  at::Tensor h = fwd_->decode(packet, device, max_elements);
  if (bits) *bits = stats_of(learns_map(fwd_spec_) ? fwd_->received_map() : at::Tensor(), fwd_spec_.nominal_bits());
  return h;
}

at::Tensor Link::receive_eval(std::string_view packet, at::Device device, int64_t max_elements) {
  return eval_codec().decode(packet, device, max_elements);
}

std::string Link::send_gradients(const at::Tensor& dh, int64_t step, int64_t micro) {
  EncodeArgs args;
  args.seed = rounding_seed(step, micro);
  args.want_decoded = false;
  if (learns_map(bwd_spec_)) {
    // The forward map only changes when the client's gates step, between optimizer steps.
    if (step != bwd_map_step_ || !bwd_map_.defined()) {
      bwd_map_ = shift_bit_map(fwd_->received_map(), bwd_budget_, bwd_spec_.bits_min, bwd_spec_.bits_max);
      bwd_map_step_ = step;
    }
    args.bits = bwd_map_;
  }
  return bwd_->encode(dh, args).packet;
}

LinkState Link::state() {
  LinkState s;
  if (gates_) {
    s.tensors.emplace_back(kGatesTensor, gates_->gates.detach());
    s.files[kGateOptimFile] = optimizer_bytes(*gate_opt_);
  }
  if (AqsgdBuffer* buf = fwd_->aqsgd_buffer()) {
    for (int64_t id : buf->ids()) s.tensors.emplace_back(kMemoryPrefix + std::to_string(id), buf->get(id).clone());
  }
  if (side_ == LinkSide::kServer && learns_map(bwd_spec_)) s.fields["bwd_budget"] = bwd_budget_;
  if (side_ == LinkSide::kClient && fwd_spec_.auto_budget) s.fields["fwd_auto_budget"] = fwd_spec_.budget;
  // Either end: the sender of gradients at a U-shaped split's tail is the receiving end (the client).
  if (bwd_spec_.auto_budget) s.fields["bwd_auto_budget"] = bwd_spec_.budget;
  return s;
}

void Link::load_state(const std::map<std::string, at::Tensor>& tensors, const FileReader& read_file,
                      const nlohmann::json& fields, const std::string& dir) {
  if (gates_) {
    auto t = tensors.find(kGatesTensor);
    const std::optional<std::string> opt = read_file(kGateOptimFile);
    if (t == tensors.end() || !opt) {
      throw Error(dir + " holds no AMAQ gates", "the checkpoint is from a run with another forward codec");
    }
    at::NoGradGuard no_grad;
    gates_->gates.copy_(t->second);
    load_optimizer(*gate_opt_, *opt, dir);
  }
  if (AqsgdBuffer* buf = fwd_->aqsgd_buffer()) {
    const std::string prefix = kMemoryPrefix;
    for (const auto& [name, t] : tensors) {
      if (name.rfind(prefix, 0) == 0) buf->put(std::stoll(name.substr(prefix.size())), t.to(at::kFloat).contiguous());
    }
  }
  if (side_ == LinkSide::kServer && learns_map(bwd_spec_)) {
    if (!fields.contains("bwd_budget"))
      throw Error(dir + " holds no backward budget", "the checkpoint is from a run with another backward codec");
    set_backward_budget(fields.at("bwd_budget").get<double>());
  }
  // budget=auto: the budgets chosen last, until the resumed run measures the link again.
  set_auto_budgets(fields.value("fwd_auto_budget", fwd_spec_.budget),
                   fields.value("bwd_auto_budget", bwd_spec_.budget));
}

}  // namespace amaq::quant

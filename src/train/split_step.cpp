#include "train/split_step.h"

#include "core/error.h"
#include "wire/messages.h"

namespace amaq::train {
namespace {

std::unique_ptr<torch::optim::AdamW> make_adamw(const std::vector<at::Tensor>& params, double lr, double wd) {
  if (params.empty()) return nullptr;
  return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(lr).weight_decay(wd));
}

}  // namespace

ClientSide::ClientSide(DecoderPart part, const quant::CodecSpec& fwd, const quant::CodecSpec& bwd, wire::Channel& channel,
                       OptimOptions opt)
    : part_(std::move(part)), fwd_(fwd), bwd_(bwd), channel_(channel) {
  opt_ = make_adamw(part_->trainable_parameters(), opt.lr, opt.weight_decay);
  if (fwd.codec == quant::CodecId::kAmaq) {
    gates_ = quant::AmaqGates(part_->config().hidden_size, fwd);
    gate_opt_ = make_adamw({gates_->gates}, opt.gate_lr, 0.0);
  }
}

wire::Status ClientSide::step(uint64_t step, const at::Tensor& ids, const at::Tensor& labels, const at::Tensor& mask,
                              const std::vector<int64_t>& sample_ids, StepStats* stats) {
  const auto B = static_cast<uint32_t>(ids.size(0)), T = static_cast<uint32_t>(ids.size(1));
  if (opt_) opt_->zero_grad();
  if (gate_opt_) gate_opt_->zero_grad();
  at::Tensor h = part_->forward(ids, mask);  // (B, T, C)

  quant::EncodeArgs args;
  args.sample_ids = sample_ids;
  args.seed = step;
  if (gates_) args.bits = gates_->bit_map();
  quant::Encoded e = fwd_.encode(h, args);
  at::Tensor hq = quant::fake_quant(h, e, gates_ ? gates_->bits_continuous() : at::Tensor());

  wire::ForwardMsg fm;
  fm.step = step;
  fm.batch = B;
  fm.seq = T;
  at::Tensor l = labels.to(at::kLong).contiguous();
  fm.labels.assign(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + l.numel());
  if (mask.defined()) {
    at::Tensor m = mask.to(at::kByte).contiguous();
    fm.mask.assign(m.data_ptr<uint8_t>(), m.data_ptr<uint8_t>() + m.numel());
  }
  fm.sample_ids = sample_ids;
  fm.packet = std::move(e.packet);
  wire::Frame frame{wire::MessageType::kForward, 0, fm.encode()};
  const uint64_t sent_before = channel_.accounting().bytes_sent(), recv_before = channel_.accounting().bytes_received();
  wire::Status s = channel_.send(frame);
  if (!s.ok()) return s;
  s = channel_.receive(&frame, std::chrono::minutes(10));
  if (!s.ok()) return s;
  if (frame.type == wire::MessageType::kError) return wire::parse_error_payload(frame.payload);
  wire::BackwardMsg bm;
  if (frame.type != wire::MessageType::kBackward) return wire::Status::Fail(wire::ErrorCode::kBadMessage, "expected BACKWARD");
  s = wire::BackwardMsg::decode(frame.payload, &bm);
  if (!s.ok()) return s;
  if (bm.step != step) return wire::Status::Fail(wire::ErrorCode::kBadMessage, "BACKWARD for step " + std::to_string(bm.step));
  at::Tensor dh;
  try {
    dh = bwd_.decode(bm.packet);
  } catch (const Error& err) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage, err.what());
  }
  if (dh.sizes() != h.sizes()) return wire::Status::Fail(wire::ErrorCode::kBadMessage, "gradient shape differs from the activation's");

  // d(sum(hq * dh))/dhq = dh: the server's gradient enters the client's graph unchanged.
  at::Tensor surrogate = (hq * dh.to(hq.scalar_type())).sum();
  double reg = 0;
  if (gates_) {
    at::Tensor r = gates_->regularization();
    reg = r.item<double>();
    surrogate = surrogate + gates_->beta_at(static_cast<int64_t>(step)) * r;
  }
  surrogate.backward();
  if (opt_) opt_->step();
  if (gate_opt_) {
    gate_opt_->step();
    if (gates_->spec().mode == quant::BudgetMode::kGuaranteed) gates_->project(gates_->budget_at(static_cast<int64_t>(step)));
  }
  if (stats) {
    stats->loss = bm.loss;
    stats->reg_loss = reg;
    stats->fwd_bytes = channel_.accounting().bytes_sent() - sent_before;
    stats->bwd_bytes = channel_.accounting().bytes_received() - recv_before;
    stats->fwd_bits = gates_ ? quant::mean_bits(args.bits) : fwd_.spec().nominal_bits();
  }
  return wire::Status::Ok();
}

ServerSide::ServerSide(DecoderPart part, const quant::CodecSpec& fwd, const quant::CodecSpec& bwd, wire::Channel& channel,
                       OptimOptions opt)
    : part_(std::move(part)), fwd_(fwd), bwd_(bwd), channel_(channel) {
  if (bwd.codec == quant::CodecId::kAmaq || bwd.codec == quant::CodecId::kAqsgd) {
    throw Error("backward codec " + bwd.to_string() + " is not supported yet", "use none or fixed for gradients for now");
  }
  opt_ = make_adamw(part_->trainable_parameters(), opt.lr, opt.weight_decay);
}

wire::Status ServerSide::serve(std::chrono::milliseconds idle_timeout, StepStats* stats) {
  wire::Frame frame;
  wire::Status s = channel_.receive(&frame, idle_timeout);
  if (!s.ok()) return s;
  auto refuse = [&](wire::Status why) {
    wire::refuse(channel_, why);
    return why;
  };
  if (frame.type == wire::MessageType::kBye) return wire::Status::Fail(wire::ErrorCode::kClosed, "client said BYE");
  if (frame.type != wire::MessageType::kForward) return refuse(wire::Status::Fail(wire::ErrorCode::kBadMessage, "expected FORWARD"));
  wire::ForwardMsg fm;
  s = wire::ForwardMsg::decode(frame.payload, &fm);
  if (!s.ok()) return refuse(s);
  const int64_t B = fm.batch, T = fm.seq, C = part_->config().hidden_size;
  if (fm.labels.size() != static_cast<size_t>(B * T)) return refuse(wire::Status::Fail(wire::ErrorCode::kBadMessage, "FORWARD without labels"));
  at::Tensor h;
  try {
    h = fwd_.decode(fm.packet);
  } catch (const Error& err) {
    return refuse(wire::Status::Fail(wire::ErrorCode::kBadMessage, err.what()));
  }
  if (h.dim() != 3 || h.size(0) != B || h.size(1) != T || h.size(2) != C) {
    return refuse(wire::Status::Fail(wire::ErrorCode::kBadMessage, "activation shape does not match (batch, seq, hidden)"));
  }
  at::Tensor labels = at::from_blob(fm.labels.data(), {B, T}, at::kLong).clone();
  at::Tensor mask;
  if (!fm.mask.empty()) mask = at::from_blob(fm.mask.data(), {B, T}, at::kByte).to(at::kLong);

  if (opt_) opt_->zero_grad();
  h = h.to(part_->dtype()).requires_grad_(true);
  at::Tensor loss = causal_lm_loss(part_->forward(h, mask), labels);
  loss.backward();
  quant::Encoded e = bwd_.encode(h.grad(), {});
  wire::BackwardMsg bm;
  bm.step = fm.step;
  bm.micro_batch = fm.micro_batch;
  bm.loss = loss.item<float>();
  bm.packet = std::move(e.packet);
  s = channel_.send({wire::MessageType::kBackward, 0, bm.encode()});
  if (!s.ok()) return s;
  if (opt_) opt_->step();
  if (stats) stats->loss = bm.loss;
  return wire::Status::Ok();
}

}  // namespace amaq::train

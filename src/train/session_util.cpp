#include "train/session_util.h"

#include "train/data.h"

namespace amaq::train::detail {

quant::CodecSpec direct_spec(const quant::CodecSpec& spec) {
  quant::CodecSpec d;
  d.codec = quant::CodecId::kFixed;
  d.bits = spec.bits;
  d.granularity = quant::Granularity::kToken;
  return d;
}

quant::CodecSpec backward_spec(const quant::CodecSpec& spec) {
  return spec.codec == quant::CodecId::kAqsgd ? direct_spec(spec) : spec;
}

void add_aqsgd_state(quant::Codec& codec, NamedTensors* out) {
  quant::AqsgdBuffer* buf = codec.aqsgd_buffer();
  if (!buf) return;
  for (int64_t id : buf->ids()) out->emplace_back("aqsgd/" + std::to_string(id), buf->get(id).clone());
}

void restore_aqsgd_state(quant::Codec& codec, const std::map<std::string, at::Tensor>& tensors) {
  quant::AqsgdBuffer* buf = codec.aqsgd_buffer();
  if (!buf) return;
  for (const auto& [name, t] : tensors) {
    if (name.rfind("aqsgd/", 0) == 0) buf->put(std::stoll(name.substr(6)), t.to(at::kFloat).contiguous());
  }
}

wire::Status send_control(wire::Channel& ch, wire::ControlKind kind, const nlohmann::json& j, std::string blob) {
  wire::ControlMsg m{kind, j.dump(), std::move(blob)};
  return ch.send({wire::MessageType::kControl, 0, m.encode()});
}

wire::Status expect(wire::Channel& ch, wire::MessageType type, std::chrono::milliseconds timeout, wire::Frame* f) {
  wire::Status s = ch.receive(f, timeout);
  if (!s.ok()) return s;
  if (f->type == wire::MessageType::kError) return wire::parse_error_payload(f->payload);
  if (f->type != type) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage,
                              std::string("expected ") + wire::message_name(type) + ", got " + wire::message_name(f->type));
  }
  return wire::Status::Ok();
}

wire::Status parse_control(const wire::Frame& f, wire::ControlKind kind, nlohmann::json* j, std::string* blob) {
  if (f.type != wire::MessageType::kControl) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage, std::string("expected CONTROL, got ") + wire::message_name(f.type));
  }
  wire::ControlMsg m;
  wire::Status s = wire::ControlMsg::decode(f.payload, &m);
  if (!s.ok()) return s;
  if (m.kind != kind) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage, "CONTROL of kind " + std::to_string(static_cast<int>(m.kind)) +
                                                                ", expected " + std::to_string(static_cast<int>(kind)));
  }
  *j = nlohmann::json::parse(m.json, nullptr, false);
  if (j->is_discarded() || !j->is_object()) return wire::Status::Fail(wire::ErrorCode::kBadMessage, "CONTROL body is not a JSON object");
  if (blob) *blob = std::move(m.blob);
  return wire::Status::Ok();
}

bool valid_run_id(const std::string& id) {
  return id.size() >= 8 && id.size() <= 64 && id.find_first_not_of("0123456789abcdef") == std::string::npos;
}

wire::EvalResultMsg score_rows(const at::Tensor& logits, const at::Tensor& labels, uint64_t step) {
  at::Tensor lp = at::log_softmax(logits.slice(1, 0, -1).to(at::kFloat), -1);  // (B, T-1, V)
  at::Tensor target = labels.slice(1, 1);
  at::Tensor valid = target != kIgnoreLabel;
  at::Tensor safe = at::where(valid, target, at::zeros_like(target));
  at::Tensor nll = -lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid;
  at::Tensor hit = (lp.argmax(-1) == target) & valid;
  at::Tensor nll_sum = nll.to(at::kDouble).sum(1), tokens = valid.sum(1), correct = hit.sum(1);
  wire::EvalResultMsg out;
  out.step = step;
  for (int64_t r = 0; r < logits.size(0); ++r) {
    out.rows.push_back({nll_sum[r].item<double>(), static_cast<uint32_t>(tokens[r].item<int64_t>()),
                        static_cast<uint32_t>(correct[r].item<int64_t>())});
  }
  return out;
}

}  // namespace amaq::train::detail

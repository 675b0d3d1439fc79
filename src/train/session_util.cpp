#include "train/session_util.h"

#include "core/error.h"
#include "quant/link.h"
#include "train/session.h"

namespace amaq::train::detail {

wire::Status send_control(wire::Channel& ch, wire::ControlKind kind, const nlohmann::json& j, std::string blob) {
  wire::ControlMsg m{kind, j.dump(), std::move(blob)};
  return ch.send({wire::MessageType::kControl, 0, m.encode()});
}

namespace {

// CONTROL kStop, the stopping server's answer to whatever the client asked: a Status of its own.
bool stop_status(const wire::Frame& f, wire::Status* s) {
  wire::ControlMsg m;
  if (f.type != wire::MessageType::kControl || !wire::ControlMsg::decode(f.payload, &m).ok() ||
      m.kind != wire::ControlKind::kStop)
    return false;
  *s = wire::Status::Fail(wire::ErrorCode::kShutdown, "the server is stopping");
  return true;
}

}  // namespace

wire::Status expect_either(wire::Channel& ch, wire::MessageType a, wire::MessageType b,
                           std::chrono::milliseconds timeout, wire::Frame* f) {
  wire::Status s = ch.receive(f, timeout);
  if (!s.ok()) return s;
  if (f->type == wire::MessageType::kError) return wire::parse_error_payload(f->payload);
  if (a != wire::MessageType::kControl && b != wire::MessageType::kControl && stop_status(*f, &s)) return s;
  if (f->type != a && f->type != b) {
    const std::string wanted =
        a == b ? wire::message_name(a) : std::string(wire::message_name(a)) + " or " + wire::message_name(b);
    return wire::Status::Fail(wire::ErrorCode::kBadMessage,
                              "expected " + wanted + ", got " + wire::message_name(f->type));
  }
  return wire::Status::Ok();
}

wire::Status expect(wire::Channel& ch, wire::MessageType type, std::chrono::milliseconds timeout, wire::Frame* f) {
  return expect_either(ch, type, type, timeout, f);
}

wire::Status parse_control(const wire::Frame& f, wire::ControlKind kind, nlohmann::json* j, std::string* blob) {
  if (f.type != wire::MessageType::kControl) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage,
                              std::string("expected CONTROL, got ") + wire::message_name(f.type));
  }
  wire::ControlMsg m;
  wire::Status s = wire::ControlMsg::decode(f.payload, &m);
  if (!s.ok()) return s;
  if (kind != wire::ControlKind::kStop && stop_status(f, &s)) return s;
  if (m.kind != kind) {
    return wire::Status::Fail(wire::ErrorCode::kBadMessage, "CONTROL of kind " +
                                                                std::to_string(static_cast<int>(m.kind)) +
                                                                ", expected " + std::to_string(static_cast<int>(kind)));
  }
  *j = nlohmann::json::parse(m.json, nullptr, false);
  if (j->is_discarded() || !j->is_object())
    return wire::Status::Fail(wire::ErrorCode::kBadMessage, "CONTROL body is not a JSON object");
  if (blob) *blob = std::move(m.blob);
  return wire::Status::Ok();
}

at::ScalarType label_scalar(wire::LabelType t) {
  switch (t) {
    case wire::LabelType::kI8:
      return at::kChar;
    case wire::LabelType::kI16:
      return at::kShort;
    case wire::LabelType::kI32:
      return at::kInt;
    case wire::LabelType::kNone:
    case wire::LabelType::kI64:
      return at::kLong;
  }
  return at::kLong;
}

}  // namespace amaq::train::detail

namespace amaq::train {

void check_tail_codecs(const quant::CodecSpec& fwd, const quant::CodecSpec& bwd, const quant::CodecSpec& tail_fwd,
                       const quant::CodecSpec& tail_bwd) {
  quant::Link::validate(tail_fwd, tail_bwd);
  // budget=auto picks one budget per direction of the link, for both tensors that travel it.
  const auto same_direction = [](const quant::CodecSpec& a, const char* a_flag, const quant::CodecSpec& b,
                                 const char* b_flag, const char* direction) {
    if (a.auto_budget == b.auto_budget) return;
    const bool first = a.auto_budget;
    throw Error(std::string("budget=auto in ") + (first ? a_flag : b_flag) + " " + (first ? a : b).to_string() +
                    " but not in " + (first ? b_flag : a_flag) + " " + (first ? b : a).to_string() +
                    ": with --tail-split both travel " + direction +
                    ", and budget=auto chooses one budget for each direction of the link",
                "give budget=auto to both, or to neither");
  };
  same_direction(fwd, "--fwd-codec", tail_bwd, "--tail-bwd-codec", "up");
  same_direction(bwd, "--bwd-codec", tail_fwd, "--tail-fwd-codec", "down");
}

}  // namespace amaq::train

// libFuzzer target for everything that parses bytes from an untrusted peer or a run directory:
// the frame decoder (fed in fuzzer-chosen chunk sizes), the server's handshake state machine
// (HELLO, AUTH), the training message bodies and CONTROL's JSON, the SCHEDULE body, the side
// options a server reports, run.json and a checkpoint's state.json. The first byte chooses: below
// 128, a frame stream cut in chunks of 1 + byte % 64; from 128, one JSON document for the
// SCHEDULE / run.json / state.json / side options parser.
// Built with clang -fsanitize=fuzzer,address,undefined by `make fuzz`; `make test` runs it 60 s.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/error.h"
#include "core/json.h"
#include "train/options.h"
#include "wire/channel.h"
#include "wire/frame.h"
#include "wire/handshake.h"
#include "wire/messages.h"

namespace {

// The JSON a peer or a run directory hands over: parsed, or refused with amaq::Error (any other
// exception escapes and is a finding).
void parse_document(uint8_t which, const std::string& text) {
  try {
    const auto j = nlohmann::json::parse(text, nullptr, false);
    switch (which % 4) {
      case 0:
        if (!j.is_discarded()) amaq::train::ScheduleRequest::from_json(j);
        break;
      case 1:
        amaq::train::parse_run_file(text, "run.json");
        break;
      case 2:
        amaq::train::parse_state_file(text, "state.json");
        break;
      default:
        if (!j.is_discarded()) amaq::train::SideOptions::from_json(j);
        break;
    }
  } catch (const amaq::Error&) {
  }
}

const amaq::wire::ServerPolicy& policy() {
  static const amaq::wire::ServerPolicy p = [] {
    amaq::wire::ServerPolicy q;
    q.model_fingerprint = "fingerprint";
    q.split = 2;
    q.fwd_codec = q.bwd_codec = "none";
    q.token = "fuzz-token";
    return q;
  }();
  return p;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] >= 128) {
    parse_document(data[0] - 128, std::string(rest));
    return 0;
  }
  const size_t chunk = 1 + data[0] % 64;  // how the stream is fragmented
  amaq::wire::FrameDecoder decoder(1 << 16);
  amaq::wire::ServerHandshake handshake(policy(), 1);
  bool handshake_over = false;
  while (!rest.empty()) {
    const size_t n = std::min(chunk, rest.size());
    if (!decoder.feed(rest.substr(0, n)).ok()) break;
    rest.remove_prefix(n);
    amaq::wire::Frame f;
    while (decoder.next(&f)) {
      if (!handshake_over) handshake_over = handshake.on_frame(f).state != amaq::wire::ServerHandshake::State::kMore;
      amaq::wire::Hello hello;
      amaq::wire::ForwardMsg fwd;
      amaq::wire::BackwardMsg bwd;
      amaq::wire::ControlMsg ctl;
      amaq::wire::EvalResultMsg eval;
      switch (f.type) {
        case amaq::wire::MessageType::kHello:
          amaq::wire::Hello::parse(f.payload, &hello);
          break;
        case amaq::wire::MessageType::kForward:
        case amaq::wire::MessageType::kEval:
          amaq::wire::ForwardMsg::decode(f.payload, &fwd);
          amaq::wire::EvalResultMsg::decode(f.payload, &eval);
          break;
        case amaq::wire::MessageType::kBackward:
          amaq::wire::BackwardMsg::decode(f.payload, &bwd);
          break;
        case amaq::wire::MessageType::kControl:
          if (amaq::wire::ControlMsg::decode(f.payload, &ctl).ok()) {
            // The body as the server reads a STEP or CHECKPOINT: an integer "step" or a refusal.
            const auto j = nlohmann::json::parse(ctl.json, nullptr, false);
            try {
              if (j.is_object() && j.contains("step")) (void)amaq::json_int<int64_t>(j, "step");
            } catch (const amaq::Error&) {
            }
          }
          break;
        case amaq::wire::MessageType::kError:
          amaq::wire::parse_error_payload(f.payload);
          break;
        default:
          (void)nlohmann::json::parse(f.payload, nullptr, false);
          break;
      }
    }
    (void)decoder.wanted();
  }
  return 0;
}

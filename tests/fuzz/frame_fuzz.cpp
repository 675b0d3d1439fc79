// libFuzzer target for everything that parses bytes from an untrusted peer before a session is
// established: the frame decoder (fed in fuzzer-chosen chunk sizes), the handshake messages and
// the training message bodies.
// Built with clang -fsanitize=fuzzer,address,undefined by `make fuzz`; `make test` runs it 60 s.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "wire/channel.h"
#include "wire/frame.h"
#include "wire/handshake.h"
#include "wire/messages.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const size_t chunk = 1 + data[0] % 64;  // first byte: how the stream is fragmented
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  amaq::wire::FrameDecoder decoder(1 << 16);
  while (!rest.empty()) {
    const size_t n = std::min(chunk, rest.size());
    if (!decoder.feed(rest.substr(0, n)).ok()) break;
    rest.remove_prefix(n);
    amaq::wire::Frame f;
    while (decoder.next(&f)) {
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
          amaq::wire::ControlMsg::decode(f.payload, &ctl);
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

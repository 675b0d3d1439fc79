#include "wire/frame.h"

#include <boost/crc.hpp>
#include <cstring>

namespace amaq::wire {

const char* message_name(MessageType t) {
  switch (t) {
    case MessageType::kHello:
      return "HELLO";
    case MessageType::kChallenge:
      return "CHALLENGE";
    case MessageType::kAuth:
      return "AUTH";
    case MessageType::kHelloAck:
      return "HELLO_ACK";
    case MessageType::kForward:
      return "FORWARD";
    case MessageType::kBackward:
      return "BACKWARD";
    case MessageType::kEval:
      return "EVAL";
    case MessageType::kControl:
      return "CONTROL";
    case MessageType::kHeartbeat:
      return "HEARTBEAT";
    case MessageType::kError:
      return "ERROR";
    case MessageType::kTailForward:
      return "TAIL_FORWARD";
    case MessageType::kTailBackward:
      return "TAIL_BACKWARD";
    case MessageType::kBye:
      return "BYE";
  }
  return "UNKNOWN";
}

const char* error_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::kOk:
      return "ok";
    case ErrorCode::kBadMagic:
      return "bad magic";
    case ErrorCode::kBadVersion:
      return "unsupported protocol version";
    case ErrorCode::kBadType:
      return "unknown message type";
    case ErrorCode::kTooLarge:
      return "frame too large";
    case ErrorCode::kBadChecksum:
      return "checksum mismatch";
    case ErrorCode::kTruncated:
      return "truncated frame";
    case ErrorCode::kBadAuth:
      return "authentication failed";
    case ErrorCode::kModelMismatch:
      return "different model";
    case ErrorCode::kSplitMismatch:
      return "different split";
    case ErrorCode::kCodecMismatch:
      return "different codec";
    case ErrorCode::kBadMessage:
      return "malformed message";
    case ErrorCode::kTimeout:
      return "timeout";
    case ErrorCode::kClosed:
      return "connection closed";
    case ErrorCode::kInternal:
      return "internal error";
    case ErrorCode::kTls:
      return "TLS failure";
    case ErrorCode::kResume:
      return "cannot resume";
    case ErrorCode::kBusy:
      return "server busy";
    case ErrorCode::kShutdown:
      return "server stopping";
    case ErrorCode::kOverBudget:
      return "over the server's budget";
    case ErrorCode::kFederation:
      return "federation failed";
  }
  return "unknown error";
}

uint32_t crc32c_portable_extend(uint32_t crc, const void* data, size_t size) {
  // Boost takes the starting remainder unreflected; the register of a finished CRC is ~crc, reflected.
  uint32_t start = 0;
  for (int bit = 0; bit < 32; ++bit)
    if ((~crc >> bit) & 1u) start |= 1u << (31 - bit);
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> c(start);
  c.process_bytes(data, size);
  return c.checksum();
}

uint32_t crc32c_portable(const void* data, size_t size) {
  return crc32c_portable_extend(0, data, size);
}

#if defined(__x86_64__)
namespace {

// CRC32C in the reflected register form the SSE4.2 instruction uses, where bit 31 stands for x^0.
constexpr uint32_t kCrc32cPoly = 0x82F63B78u;

// a * b mod P over GF(2), a != 0.
uint32_t crc32c_multiply(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) return p;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kCrc32cPoly : b >> 1;
  }
}

// The register advanced over n zero bytes, s * x^(8n) mod P, as four byte tables (the map is linear in s).
class Crc32cShift {
 public:
  explicit Crc32cShift(size_t n) {
    uint32_t x8 = 1u << 23;  // x^8
    uint32_t k = 1u << 31;   // x^0, then x^(8n) by square-and-multiply
    for (size_t e = n; e > 0; e >>= 1, x8 = crc32c_multiply(x8, x8))
      if (e & 1) k = crc32c_multiply(k, x8);
    for (int byte = 0; byte < 4; ++byte)
      for (uint32_t v = 0; v < 256; ++v) table_[byte][v] = crc32c_multiply(k, v << (8 * byte));
  }
  uint32_t operator()(uint32_t s) const {
    return table_[0][s & 0xFF] ^ table_[1][(s >> 8) & 0xFF] ^ table_[2][(s >> 16) & 0xFF] ^ table_[3][s >> 24];
  }

 private:
  uint32_t table_[4][256];
};

__attribute__((target("sse4.2"))) inline uint64_t crc32c_word(uint64_t crc, const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return __builtin_ia32_crc32di(crc, v);
}

// SSE4.2's crc32 instruction computes CRC32C 8 bytes at a time. It has a latency of 3 cycles and a
// throughput of one a cycle, so blocks of three lanes run as three independent chains, joined with
// CRC(A B C) = shift(CRC(A), |B C|) ^ shift(CRC0(B), |C|) ^ CRC0(C) (CRC0: from a zero register).
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(uint32_t start, const void* data, size_t size) {
  constexpr size_t kLane = 4096;
  static const Crc32cShift shift_one(kLane), shift_two(2 * kLane);
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t crc = ~start;
  for (; size >= 3 * kLane; size -= 3 * kLane, p += 3 * kLane) {
    uint64_t a = crc, b = 0, c = 0;
    for (size_t i = 0; i < kLane; i += 8) {
      a = crc32c_word(a, p + i);
      b = crc32c_word(b, p + kLane + i);
      c = crc32c_word(c, p + 2 * kLane + i);
    }
    crc = shift_two(static_cast<uint32_t>(a)) ^ shift_one(static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(c);
  }
  for (; size >= 8; size -= 8, p += 8) crc = crc32c_word(crc, p);
  uint32_t c = static_cast<uint32_t>(crc);
  for (; size > 0; --size, ++p) c = __builtin_ia32_crc32qi(c, *p);
  return c ^ 0xFFFFFFFFu;
}

}  // namespace
#endif

uint32_t crc32c_extend(uint32_t crc, const void* data, size_t size) {
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  if (hw) return crc32c_sse42(crc, data, size);
#endif
  return crc32c_portable_extend(crc, data, size);
}

uint32_t crc32c(const void* data, size_t size) {
  return crc32c_extend(0, data, size);
}

FrameHeader frame_header(const Frame& f) {
  FrameHeader h;
  h.type = static_cast<uint8_t>(f.type);
  h.flags = f.flags;
  h.length = f.payload.size();
  h.checksum = crc32c(f.payload.data(), f.payload.size());
  return h;
}

std::string encode_frame(const Frame& f) {
  const FrameHeader h = frame_header(f);
  std::string out;
  out.reserve(sizeof h + f.payload.size());
  out.append(reinterpret_cast<const char*>(&h), sizeof h);
  out.append(f.payload);
  return out;
}

Status check_header(const FrameHeader& h, uint64_t max_payload_bytes) {
  if (h.magic != kFrameMagic)
    return Status::Fail(ErrorCode::kBadMagic, "frame does not start with AMQF (not an amaq peer?)");
  if (h.version != kProtocolVersion) {
    return Status::Fail(ErrorCode::kBadVersion, "peer speaks protocol version " + std::to_string(h.version) +
                                                    ", this build speaks " + std::to_string(kProtocolVersion));
  }
  if (h.type == 0 || h.type > kMaxMessageType)
    return Status::Fail(ErrorCode::kBadType, "message type " + std::to_string(h.type));
  if (h.length > max_payload_bytes) {
    return Status::Fail(ErrorCode::kTooLarge, "frame of " + std::to_string(h.length) + " bytes exceeds the limit of " +
                                                  std::to_string(max_payload_bytes));
  }
  return Status::Ok();
}

Status FrameDecoder::feed(std::string_view bytes) {
  while (status_.ok() && !bytes.empty()) {
    const auto [at, room] = buffer();
    const size_t take = std::min(room, bytes.size());
    std::memcpy(at, bytes.data(), take);
    bytes.remove_prefix(take);
    commit(take);
  }
  return status_;
}

std::pair<char*, size_t> FrameDecoder::buffer() {
  if (header_have_ < sizeof(FrameHeader)) return {header_bytes_ + header_have_, sizeof(FrameHeader) - header_have_};
  if (payload_have_ == payload_.size())
    payload_.resize(static_cast<size_t>(std::min<uint64_t>(header_.length, payload_have_ + kGrowStep)));
  return {payload_.data() + payload_have_, payload_.size() - payload_have_};
}

Status FrameDecoder::commit(size_t n) {
  if (!status_.ok() || n == 0) return status_;
  if (header_have_ < sizeof(FrameHeader)) {
    header_have_ += n;
    if (header_have_ < sizeof(FrameHeader)) return status_;
    std::memcpy(&header_, header_bytes_, sizeof header_);
    status_ = check_header(header_, max_payload_);  // before a single payload byte is kept
    if (!status_.ok()) return status_;
    payload_.clear();
    payload_.reserve(static_cast<size_t>(std::min<uint64_t>(header_.length, kMaxReserve)));
    payload_have_ = 0;
    payload_crc_ = 0;
  } else {
    // Checked as the bytes arrive: a socket reader computes it while the rest is still in flight.
    payload_crc_ = crc32c_extend(payload_crc_, payload_.data() + payload_have_, n);
    payload_have_ += n;
  }
  if (payload_have_ == header_.length) finish_frame();
  return status_;
}

void FrameDecoder::finish_frame() {
  const auto type = static_cast<MessageType>(header_.type);
  payload_.resize(static_cast<size_t>(payload_have_));
  if (payload_crc_ != header_.checksum) {
    status_ =
        Status::Fail(ErrorCode::kBadChecksum, std::string(message_name(type)) + " frame payload fails its CRC32C");
    return;
  }
  ready_.push_back(Frame{type, header_.flags, std::move(payload_)});
  payload_ = std::string();
  payload_have_ = 0;
  header_have_ = 0;
}

bool FrameDecoder::next(Frame* out) {
  if (ready_.empty()) return false;
  *out = std::move(ready_.front());
  ready_.pop_front();
  return true;
}

uint64_t FrameDecoder::wanted() const {
  if (header_have_ < sizeof(FrameHeader)) return sizeof(FrameHeader) - header_have_;
  return std::max<uint64_t>(1, header_.length - payload_have_);
}

}  // namespace amaq::wire

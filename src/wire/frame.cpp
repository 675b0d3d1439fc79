#include "wire/frame.h"

#include <boost/crc.hpp>

#include <cstring>

namespace amaq::wire {

const char* message_name(MessageType t) {
  switch (t) {
    case MessageType::kHello: return "HELLO";
    case MessageType::kChallenge: return "CHALLENGE";
    case MessageType::kAuth: return "AUTH";
    case MessageType::kHelloAck: return "HELLO_ACK";
    case MessageType::kForward: return "FORWARD";
    case MessageType::kBackward: return "BACKWARD";
    case MessageType::kEval: return "EVAL";
    case MessageType::kControl: return "CONTROL";
    case MessageType::kHeartbeat: return "HEARTBEAT";
    case MessageType::kError: return "ERROR";
    case MessageType::kBye: return "BYE";
  }
  return "UNKNOWN";
}

const char* error_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::kOk: return "ok";
    case ErrorCode::kBadMagic: return "bad magic";
    case ErrorCode::kBadVersion: return "unsupported protocol version";
    case ErrorCode::kBadType: return "unknown message type";
    case ErrorCode::kTooLarge: return "frame too large";
    case ErrorCode::kBadChecksum: return "checksum mismatch";
    case ErrorCode::kTruncated: return "truncated frame";
    case ErrorCode::kBadAuth: return "authentication failed";
    case ErrorCode::kModelMismatch: return "different model";
    case ErrorCode::kSplitMismatch: return "different split";
    case ErrorCode::kCodecMismatch: return "different codec";
    case ErrorCode::kBadMessage: return "malformed message";
    case ErrorCode::kTimeout: return "timeout";
    case ErrorCode::kClosed: return "connection closed";
    case ErrorCode::kInternal: return "internal error";
    case ErrorCode::kTls: return "TLS failure";
  }
  return "unknown error";
}

uint32_t crc32c(const void* data, size_t size) {
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> crc;
  crc.process_bytes(data, size);
  return crc.checksum();
}

std::string encode_frame(const Frame& f) {
  FrameHeader h;
  h.type = static_cast<uint8_t>(f.type);
  h.flags = f.flags;
  h.length = f.payload.size();
  h.checksum = crc32c(f.payload.data(), f.payload.size());
  std::string out(sizeof h + f.payload.size(), '\0');
  std::memcpy(out.data(), &h, sizeof h);
  if (!f.payload.empty()) std::memcpy(out.data() + sizeof h, f.payload.data(), f.payload.size());
  return out;
}

Status check_header(const FrameHeader& h, uint64_t max_payload_bytes) {
  if (h.magic != kFrameMagic) return Status::Fail(ErrorCode::kBadMagic, "frame does not start with AMQF (not an amaq peer?)");
  if (h.version != kProtocolVersion) {
    return Status::Fail(ErrorCode::kBadVersion, "peer speaks protocol version " + std::to_string(h.version) + ", this build speaks " +
                                                    std::to_string(kProtocolVersion));
  }
  if (h.type == 0 || h.type > kMaxMessageType) return Status::Fail(ErrorCode::kBadType, "message type " + std::to_string(h.type));
  if (h.length > max_payload_bytes) {
    return Status::Fail(ErrorCode::kTooLarge, "frame of " + std::to_string(h.length) + " bytes exceeds the limit of " +
                                                  std::to_string(max_payload_bytes));
  }
  return Status::Ok();
}

Status FrameDecoder::feed(std::string_view bytes) {
  if (!status_.ok()) return status_;
  buffer_.append(bytes.data(), bytes.size());
  while (buffer_.size() >= sizeof(FrameHeader)) {
    FrameHeader h;
    std::memcpy(&h, buffer_.data(), sizeof h);
    status_ = check_header(h, max_payload_);
    if (!status_.ok()) return status_;
    if (buffer_.size() - sizeof h < h.length) break;  // payload not complete yet
    Frame f;
    f.type = static_cast<MessageType>(h.type);
    f.flags = h.flags;
    f.payload = buffer_.substr(sizeof h, h.length);
    if (crc32c(f.payload.data(), f.payload.size()) != h.checksum) {
      status_ = Status::Fail(ErrorCode::kBadChecksum, std::string(message_name(f.type)) + " frame payload fails its CRC32C");
      return status_;
    }
    buffer_.erase(0, sizeof h + h.length);
    ready_.push_back(std::move(f));
  }
  return status_;
}

bool FrameDecoder::next(Frame* out) {
  if (ready_.empty()) return false;
  *out = std::move(ready_.front());
  ready_.pop_front();
  return true;
}

uint64_t FrameDecoder::wanted() const {
  if (buffer_.size() < sizeof(FrameHeader)) return sizeof(FrameHeader) - buffer_.size();
  FrameHeader h;
  std::memcpy(&h, buffer_.data(), sizeof h);
  return std::max<uint64_t>(1, sizeof h + h.length - buffer_.size());
}

}  // namespace amaq::wire

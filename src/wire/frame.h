// Frames: the unit the transport moves. Layout (little-endian), documented in docs/protocol.md:
//
//   FrameHeader (24 bytes)   magic "AMQF", protocol version, message type, flags,
//                            payload length (u64), CRC32C of the payload, reserved
//   payload                  `length` bytes
//
// The reader checks magic, version, type and that length <= the configured maximum before it
// allocates anything, then the checksum once the payload is in.
#pragma once
#include <cstdint>
#include <deque>
#include <string>
#include <string_view>

namespace amaq::wire {

constexpr uint32_t kFrameMagic = 0x46514D41;  // "AMQF"
// 2: FORWARD labels in the narrowest integer type; 3: BACKWARD codec time; 4: BACKWARD the FORWARD's arrival time
constexpr uint16_t kProtocolVersion = 6;

/// Message types. Values only ever grow; a reader refuses those it does not know.
enum class MessageType : uint8_t {
  kHello = 1,      ///< client -> server: version, model fingerprint, split, codecs, client nonce
  kChallenge = 2,  ///< server -> client: server nonce for the token HMAC
  kAuth = 3,       ///< client -> server: HMAC(token, transcript)
  kHelloAck = 4,   ///< server -> client: session id, server settings, server proof
  kForward = 5,    ///< step, micro-batch, labels/mask, compressed activations
  kBackward = 6,   ///< step, micro-batch, compressed gradients
  kEval = 7,
  kControl = 8,  ///< checkpoint now, bit-width sync, schedule
  kHeartbeat = 9,
  kError = 10,  ///< code + text, then the sender closes
  kBye = 11,
  kTailForward = 12,   ///< U-shaped split, server -> client: the activations at the tail split
  kTailBackward = 13,  ///< U-shaped split, client -> server: their gradient
};
constexpr uint8_t kMaxMessageType = 13;
const char* message_name(MessageType t);

#pragma pack(push, 1)
struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t version = kProtocolVersion;
  uint8_t type = 0;
  uint8_t flags = 0;
  uint64_t length = 0;    ///< payload bytes
  uint32_t checksum = 0;  ///< CRC32C (Castagnoli) of the payload
  uint32_t reserved = 0;
};
#pragma pack(pop)
static_assert(sizeof(FrameHeader) == 24, "the frame header is part of the wire protocol");

/// Why a frame or a session failed. Values only grow.
enum class ErrorCode : uint16_t {
  kOk = 0,
  kBadMagic = 1,
  kBadVersion = 2,
  kBadType = 3,
  kTooLarge = 4,
  kBadChecksum = 5,
  kTruncated = 6,
  kBadAuth = 7,
  kModelMismatch = 8,
  kSplitMismatch = 9,
  kCodecMismatch = 10,
  kBadMessage = 11,
  kTimeout = 12,
  kClosed = 13,
  kInternal = 14,
  kTls = 15,
  kResume = 16,      ///< the server cannot resume the run at the step the client asks for
  kBusy = 17,        ///< the server runs as many sessions as it may; try again later
  kShutdown = 18,    ///< the server is stopping (SIGTERM); the run resumes from its last checkpoint
  kOverBudget = 19,  ///< the run alone needs more memory than the server allows all its runs
  kFederation = 20,  ///< the run's federation refused it or its other members did not come
};
const char* error_name(ErrorCode c);

/// What network operations return instead of throwing through the session loop.
struct Status {
  ErrorCode code = ErrorCode::kOk;
  std::string message;
  bool ok() const { return code == ErrorCode::kOk; }
  static Status Ok() { return {}; }
  static Status Fail(ErrorCode c, std::string m) { return {c, std::move(m)}; }
};

struct Frame {
  MessageType type = MessageType::kHeartbeat;
  uint8_t flags = 0;
  std::string payload;
  /// Received over a socket: the seconds the whole frame took to cross the link, at the rate its
  /// bytes arrived after the first ones, when the receiver was already waiting for it (so the rate
  /// is the link's, not a buffer's); 0 when most of it came with its first bytes (faster than can
  /// be timed); -1 when not measured. Not part of the frame's bytes.
  double arrival_seconds = -1;
};

/// CRC32C (Castagnoli): the SSE4.2 instruction where the CPU has it, else Boost.CRC.
uint32_t crc32c(const void* data, size_t size);
/// The CRC32C of bytes whose CRC32C is `crc`, followed by `data` (crc32c(d, n) == crc32c_extend(0, d, n)).
uint32_t crc32c_extend(uint32_t crc, const void* data, size_t size);
/// Boost.CRC's table-driven CRC32C: the portable path and the reference the fast one is tested against.
uint32_t crc32c_portable(const void* data, size_t size);
uint32_t crc32c_portable_extend(uint32_t crc, const void* data, size_t size);

/// The header announcing `f` (checksum computed).
FrameHeader frame_header(const Frame& f);
/// Header + payload bytes of a frame.
std::string encode_frame(const Frame& f);

/// Checks a header before any payload is read or allocated.
Status check_header(const FrameHeader& h, uint64_t max_payload_bytes);

/// Incremental decoder over a byte stream (a socket's reads, a fuzzer's input): feed bytes, or
/// fill buffer() in place and commit() them, and take complete frames. The header is checked before
/// a payload byte is kept. After the first error it stays failed.
class FrameDecoder {
 public:
  /// A header's length is trusted for at most this much up-front reservation; beyond it the
  /// payload buffer grows only as bytes actually arrive.
  static constexpr uint64_t kMaxReserve = uint64_t{64} << 20;
  /// The payload buffer grows by at most this much per buffer() call.
  static constexpr uint64_t kGrowStep = uint64_t{4} << 20;

  explicit FrameDecoder(uint64_t max_payload_bytes) : max_payload_(max_payload_bytes) {}
  /// The limit for frames whose header has not arrived yet (a server raises it after authentication).
  void set_max_payload(uint64_t v) { max_payload_ = v; }
  /// Consumes bytes (copies them through buffer() and commit()); returns the first error met, if any.
  Status feed(std::string_view bytes);
  /// Where the next bytes of the frame in progress go (the rest of the header, or of the payload,
  /// at most kGrowStep at a time): a reader may fill it straight from a socket.
  std::pair<char*, size_t> buffer();
  /// The first `n` bytes of buffer() hold data now; returns the first error met, if any.
  Status commit(size_t n);
  /// Pops the next complete frame; false when none is complete yet.
  bool next(Frame* out);
  /// Bytes the decoder still needs before it can finish the frame in progress (at least 1).
  uint64_t wanted() const;
  /// Holds no byte of a frame not yet popped by next().
  bool empty() const { return header_have_ == 0 && ready_.empty(); }
  const Status& status() const { return status_; }

 private:
  void finish_frame();

  uint64_t max_payload_;
  char header_bytes_[sizeof(FrameHeader)] = {};  // the header being received
  size_t header_have_ = 0;
  FrameHeader header_{};
  std::string payload_;  // the payload being received: its first payload_have_ bytes are data
  uint64_t payload_have_ = 0;
  uint32_t payload_crc_ = 0;  // CRC32C of the payload's bytes so far
  std::deque<Frame> ready_;
  Status status_;
};

}  // namespace amaq::wire

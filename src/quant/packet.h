// The packet: one compressed tensor as it goes on the wire. Little-endian throughout.
//
//   PacketHeader (24 bytes, below)
//   dims            ndim x u32                          last dim = channels
//   [sample ids]    B x u64                             aqsgd
//   [sample kinds]  B x u8 (0 delta, 1 full)            aqsgd
//   [bit map]       ceil(C / 2) bytes, 4 bits/channel   amaq, when kFlagBitMap (else the map of packet map_id)
//   [ranges]        groups x (lo, hi) fp16              fixed, amaq (relative to `scale`)
//   [levels, steps] 2^bits x f32, groups x fp16         fixed with kFlagLevels, instead of ranges (levels.h)
//   [scales]        delta samples x C fp16              aqsgd (relative to `scale`)
//   [full samples]  full samples x T x C in `dtype`     aqsgd
//   codes           densely bit-packed (bitpack.h)      fixed, amaq, aqsgd
//                   or, with kFlagEntropy: u32 size, then per width present a u32 size and a zstd
//                   frame of that width's codes (entropy.h)
//   raw values      numel in `dtype`                    none
//   [ecsq body]     levels, rANS table and streams       ecsq (ecsq.h; `scale` is its step)
//
// A reader distrusts every field: magic, version, codec, dtype, dims (product bounded), bit-widths
// in 1..8, finite scales, and a total length that must equal what the fields imply.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace amaq::quant {

constexpr uint32_t kPacketMagic = 0x50514D41;  // "AMQP"
constexpr uint8_t kPacketVersion = 3;  // 2: ec=zstd streams in 1 MiB frames; non-uniform levels; 3: ecsq by htscodecs
constexpr int64_t kMaxPacketElements = int64_t{1} << 34;

enum PacketFlags : uint8_t {
  kFlagBitMap = 1,    ///< the per-channel bit map follows (it changed since the last packet)
  kFlagHadamard = 2,  ///< fixed, amaq: codes are of each range group Hadamard-rotated (quant/rotation.h)
  kFlagEntropy = 4,   ///< fixed, amaq: entropy-coded codes (quant/entropy.h) replace the packed codes
  kFlagLevels = 8,    ///< fixed: non-uniform levels (quant/levels.h): levels and steps replace the ranges
};

#pragma pack(push, 1)
struct PacketHeader {
  uint32_t magic = kPacketMagic;
  uint8_t version = kPacketVersion;
  uint8_t codec = 0;        ///< CodecId
  uint8_t dtype = 0;        ///< WireDtype of the decoded tensor (the sender's input dtype)
  uint8_t flags = 0;        ///< PacketFlags
  uint8_t granularity = 0;  ///< Granularity of the ranges (fixed, amaq)
  uint8_t ndim = 0;
  uint8_t bits = 0;        ///< uniform bit-width (fixed, aqsgd); 0 = per-channel map (amaq)
  uint8_t wire_dtype = 0;  ///< WireDtype of raw values on the wire (none; aqsgd full samples)
  uint32_t group = 0;      ///< channels per range group (Granularity::kGroup)
  uint32_t map_id = 0;     ///< amaq: which bit map the codes use
  float scale = 1.0f;      ///< tensor-wide multiplier of the fp16 ranges (a power of two) / scales
};
#pragma pack(pop)
static_assert(sizeof(PacketHeader) == 24, "the packet header is part of the wire format");
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire format is little-endian");

/// A malformed packet: names what is wrong.
class PacketError : public Error {
 public:
  explicit PacketError(const std::string& what)
      : Error("malformed packet: " + what, "the peer runs another amaq version or the data was corrupted in transit") {}
};

class ByteWriter {
 public:
  template <typename T>
  void put(const T& v) {
    append(&v, sizeof(T));
  }
  void append(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  /// Room for n more bytes at the end, to be written in place.
  char* grow(size_t n) {
    const size_t at = out_.size();
    out_.resize(at + n);
    return out_.data() + at;
  }
  std::string& str() { return out_; }

 private:
  std::string out_;
};

/// Sequential reads that never run past the end.
class ByteReader {
 public:
  explicit ByteReader(std::string_view data) : data_(data) {}
  template <typename T>
  T get(const char* what) {
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  const uint8_t* take(uint64_t n, const char* what) {
    if (n > data_.size() - pos_) {
      throw PacketError(std::string(what) + " needs " + std::to_string(n) + " bytes, " +
                        std::to_string(data_.size() - pos_) + " left (truncated?)");
    }
    const auto* p = reinterpret_cast<const uint8_t*>(data_.data() + pos_);
    pos_ += n;
    return p;
  }
  uint64_t remaining() const { return data_.size() - pos_; }
  void expect_end() const {
    if (remaining() != 0) throw PacketError(std::to_string(remaining()) + " unexpected trailing bytes");
  }

 private:
  std::string_view data_;
  size_t pos_ = 0;
};

}  // namespace amaq::quant

#include "quant/rans.h"

#include <htscodecs/rANS_static4x16.h>

#include <cstring>
#include <vector>

#include "quant/packet.h"

namespace amaq::quant::rans {
namespace {

// The only first bytes a stream may have: order 0 without its length (the receiver knows it),
// 32-way above 1,000 symbols, stored raw (CAT) when coding would not shrink it.
constexpr int kOrder = RANS_ORDER_X32 | RANS_ORDER_NOSZ;
constexpr uint8_t kAllowed = RANS_ORDER_X32 | RANS_ORDER_NOSZ | RANS_ORDER_CAT;
constexpr size_t kPadding = 64;  // beyond the up to 8 bytes htscodecs 1.3.0's AVX2 decoder may over-read

}  // namespace

void encode(const uint8_t* symbols, size_t n, std::string* out) {
  TORCH_INTERNAL_ASSERT(n >= 1 && n < (size_t{1} << 31), "rans::encode of ", n, " symbols");
  const auto len = static_cast<unsigned>(n);
  unsigned bound = rans_compress_bound_4x16(len, kOrder);
  thread_local std::vector<uint8_t> room;  // reused: a fresh bound-sized buffer a call is page faults
  room.resize(bound);
  // htscodecs reads its input through a non-const pointer but does not write it.
  auto* in = const_cast<uint8_t*>(symbols);
  if (!rans_compress_to_4x16(in, len, room.data(), &bound, kOrder))
    throw Error("rANS coding of " + std::to_string(n) + " symbols failed", "out of memory?");
  out->append(reinterpret_cast<const char*>(room.data()), bound);
}

void decode(std::string_view bytes, uint8_t* out, size_t n) {
  TORCH_INTERNAL_ASSERT(n >= 1 && n < (size_t{1} << 31), "rans::decode of ", n, " symbols");
  if (bytes.empty()) throw PacketError("an empty rANS stream");
  const auto method = static_cast<uint8_t>(bytes[0]);
  if ((method & ~kAllowed) != 0 || !(method & RANS_ORDER_NOSZ))
    throw PacketError("a rANS stream of method " + std::to_string(method) + ", not order 0 without its length");
  thread_local std::vector<uint8_t> padded;
  padded.resize(bytes.size() + kPadding);
  std::memcpy(padded.data(), bytes.data(), bytes.size());
  std::memset(padded.data() + bytes.size(), 0, kPadding);
  auto len = static_cast<unsigned>(n);
  if (!rans_uncompress_to_4x16(padded.data(), static_cast<unsigned>(bytes.size()), out, &len) || len != n)
    throw PacketError("a rANS stream of " + std::to_string(bytes.size()) + " bytes is not " + std::to_string(n) +
                      " symbols");
}

}  // namespace amaq::quant::rans

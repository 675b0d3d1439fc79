#include "quant/entropy.h"

#if AMAQ_HAVE_ZSTD
#include <zstd.h>
#endif

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "quant/packet.h"

namespace amaq::quant {

bool entropy_coding_built() {
#if AMAQ_HAVE_ZSTD
  return true;
#else
  return false;
#endif
}

double code_entropy_bits(const at::Tensor& codes) {
  const at::Tensor counts = at::bincount(codes.reshape({-1}).to(at::kLong)).to(at::kDouble);
  const at::Tensor p = counts.masked_select(counts > 0) / static_cast<double>(codes.numel());
  return -(p * p.log2()).sum().item<double>();
}

#if AMAQ_HAVE_ZSTD

namespace {

// zstd's level 1: its literals are Huffman-coded at any level; higher levels buy longer matches,
// which quantized activations hardly have, for several times the time.
constexpr int kLevel = 1;

// What zstd sees: one frame per width present (each with its own Huffman table: codes of different
// widths follow different distributions, and one table for all of them costs more than packing),
// holding that width's channels one after another (a channel's codes share one distribution); where
// the width is at most 4, two consecutive codes of a channel share a byte (Huffman spends at least a
// bit per symbol: on 3-bit codes alone it wastes ~0.4 bit, on pairs far less). Each frame is preceded
// by its size (u32).
int64_t stream_bytes(int64_t channels, int64_t rows, int width) {
  return channels * (width <= 4 ? (rows + 1) / 2 : rows);
}

}  // namespace

std::string entropy_encode(const at::Tensor& codes_in, const at::Tensor& bits_in) {
  const at::Tensor codes = codes_in.to(at::kByte).contiguous(), bits = bits_in.to(at::kCPU, at::kLong);
  const int64_t rows = codes.size(0);
  std::string out;
  for (int w = 1; w <= 8; ++w) {
    const at::Tensor idx = (bits == w).nonzero().reshape({-1});
    if (idx.numel() == 0) continue;
    at::Tensor stream = codes.index_select(1, idx).t();  // (channels, rows)
    if (w <= 4) {
      if (rows % 2) stream = at::constant_pad_nd(stream, {0, 1});
      stream = stream.reshape({-1, 2});
      stream = stream.select(1, 0) + stream.select(1, 1) * 16;  // no carry: both are < 16
    }
    stream = stream.contiguous();
    std::string frame(ZSTD_compressBound(static_cast<size_t>(stream.numel())), '\0');
    const size_t n =
        ZSTD_compress(frame.data(), frame.size(), stream.data_ptr(), static_cast<size_t>(stream.numel()), kLevel);
    if (ZSTD_isError(n)) throw Error(std::string("zstd could not compress the codes: ") + ZSTD_getErrorName(n), "");
    const auto size = static_cast<uint32_t>(n);
    out.append(reinterpret_cast<const char*>(&size), sizeof size);
    out.append(frame.data(), n);
  }
  return out;
}

at::Tensor entropy_decode(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits_in) {
  const at::Tensor bits = bits_in.to(at::kCPU, at::kLong);
  at::Tensor codes = at::empty({rows, bits.numel()}, at::kByte);
  int64_t at_byte = 0;
  for (int w = 1; w <= 8; ++w) {
    const at::Tensor idx = (bits == w).nonzero().reshape({-1});
    if (idx.numel() == 0) continue;
    uint32_t n = 0;
    if (at_byte + 4 > size)
      throw PacketError("the entropy-coded codes end before the frame of width " + std::to_string(w));
    std::memcpy(&n, data + at_byte, 4);
    at_byte += 4;
    if (n > size - at_byte) throw PacketError("an entropy-coded frame runs past the packet");
    const int64_t expect = stream_bytes(idx.numel(), rows, w);
    const unsigned long long content = ZSTD_getFrameContentSize(data + at_byte, n);
    if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN ||
        content != static_cast<unsigned long long>(expect)) {
      throw PacketError("the entropy-coded codes of width " + std::to_string(w) + " are not a zstd frame of " +
                        std::to_string(expect) + " bytes");
    }
    at::Tensor stream = at::empty({expect}, at::kByte);
    const size_t got = ZSTD_decompress(stream.data_ptr(), static_cast<size_t>(expect), data + at_byte, n);
    if (ZSTD_isError(got) || got != static_cast<size_t>(expect))
      throw PacketError(std::string("the entropy-coded codes do not decompress: ") +
                        (ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short"));
    at_byte += n;
    at::Tensor col;  // (channels, rows)
    if (w <= 4) {
      const at::Tensor pairs = stream.view({idx.numel(), (rows + 1) / 2});
      col = at::stack({pairs.remainder(16), pairs.div(16, "floor")}, 2).view({idx.numel(), -1});
      if (rows % 2) {
        if (col.select(1, rows).ne(0).any().item<bool>())
          throw PacketError("an entropy-coded padding code is not zero");
        col = col.narrow(1, 0, rows);
      }
    } else {
      col = stream.view({idx.numel(), rows});
    }
    // Every code must fit its width, as unpacking a bit stream guarantees by construction.
    if (col.gt((1 << w) - 1).any().item<bool>()) throw PacketError("an entropy-coded code exceeds its width");
    codes.index_copy_(1, idx, col.t());
  }
  if (at_byte != size) throw PacketError("bytes left after the entropy-coded codes");
  return codes;
}

#else

std::string entropy_encode(const at::Tensor&, const at::Tensor&) {
  throw Error("this build has no libzstd: ec=zstd is not available", "install libzstd-dev and rebuild");
}

at::Tensor entropy_decode(const uint8_t*, int64_t, int64_t, const at::Tensor&) {
  throw PacketError("an entropy-coded packet, and this build has no libzstd to decode it");
}

#endif

}  // namespace amaq::quant

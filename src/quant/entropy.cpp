#include "quant/entropy.h"

#if AMAQ_HAVE_ZSTD
#include <zstd.h>
#endif

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

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

// What zstd sees: per width present, one stream (its own Huffman tables: codes of different widths
// follow different distributions, and one table for all of them costs more than packing), holding
// that width's channels one after another (a channel's codes share one distribution); where the width
// is at most 4, two consecutive codes of a channel share a byte (Huffman spends at least a bit per
// symbol: on 3-bit codes alone it wastes ~0.4 bit, on pairs far less). The stream goes as
// independent zstd frames of kChunk bytes (the last shorter), compressed and decompressed in
// parallel, preceded by their total size (u32). The chunking does not depend on the thread count.
constexpr int64_t kChunk = int64_t{1} << 20;

int64_t stream_bytes(int64_t channels, int64_t rows, int width) {
  return channels * (width <= 4 ? (rows + 1) / 2 : rows);
}

// The channels of width w, in order.
std::vector<int64_t> channels_of(const uint8_t* bits, int64_t C, int w) {
  std::vector<int64_t> idx;
  for (int64_t c = 0; c < C; ++c)
    if (bits[c] == w) idx.push_back(c);
  return idx;
}

}  // namespace

std::string entropy_encode(const at::Tensor& codes_in, const at::Tensor& bits_in) {
  const at::Tensor codes = codes_in.to(at::kByte).contiguous(), bits = bits_in.to(at::kCPU, at::kByte).contiguous();
  const int64_t rows = codes.size(0), C = codes.size(1);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  std::string out;
  for (int w = 1; w <= 8; ++w) {
    const std::vector<int64_t> idx = channels_of(bits.data_ptr<uint8_t>(), C, w);
    if (idx.empty()) continue;
    const int64_t K = static_cast<int64_t>(idx.size()), per = w <= 4 ? (rows + 1) / 2 : rows;
    std::vector<uint8_t> stream(static_cast<size_t>(K * per));
    at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {  // channel by channel, two codes a byte
      for (int64_t k = k0; k < k1; ++k) {
        const uint8_t* col = cp + idx[k];
        uint8_t* s = stream.data() + k * per;
        if (w > 4) {
          for (int64_t r = 0; r < rows; ++r) s[r] = col[r * C];
          continue;
        }
        for (int64_t r = 0; r + 1 < rows; r += 2) s[r / 2] = static_cast<uint8_t>(col[r * C] | col[(r + 1) * C] << 4);
        if (rows % 2) s[rows / 2] = col[(rows - 1) * C];
      }
    });
    const int64_t n = K * per, chunks = (n + kChunk - 1) / kChunk;
    std::vector<std::string> frames(static_cast<size_t>(chunks));
    at::parallel_for(0, chunks, 1, [&](int64_t f0, int64_t f1) {
      for (int64_t f = f0; f < f1; ++f) {
        const size_t len = static_cast<size_t>(std::min(kChunk, n - f * kChunk));
        std::string& frame = frames[f];
        frame.resize(ZSTD_compressBound(len));
        const size_t got = ZSTD_compress(frame.data(), frame.size(), stream.data() + f * kChunk, len, kLevel);
        if (ZSTD_isError(got)) {  // only for lack of memory
          frame.clear();
          continue;
        }
        frame.resize(got);
      }
    });
    size_t total = 0;
    for (const std::string& f : frames) {
      if (f.empty()) throw Error("zstd could not compress the codes", "the machine may be out of memory");
      total += f.size();
    }
    if (total > UINT32_MAX) throw Error("the entropy-coded codes of one width exceed 4 GiB", "send smaller tensors");
    const auto size = static_cast<uint32_t>(total);
    out.append(reinterpret_cast<const char*>(&size), sizeof size);
    for (const std::string& f : frames) out += f;
  }
  return out;
}

at::Tensor entropy_decode(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits_in) {
  const at::Tensor bits = bits_in.to(at::kCPU, at::kByte).contiguous();
  const int64_t C = bits.numel();
  at::Tensor codes = at::empty({rows, C}, at::kByte);
  uint8_t* cp = codes.data_ptr<uint8_t>();
  int64_t at_byte = 0;
  for (int w = 1; w <= 8; ++w) {
    const std::vector<int64_t> idx = channels_of(bits.data_ptr<uint8_t>(), C, w);
    if (idx.empty()) continue;
    uint32_t n = 0;
    if (at_byte + 4 > size)
      throw PacketError("the entropy-coded codes end before the frames of width " + std::to_string(w));
    std::memcpy(&n, data + at_byte, 4);
    at_byte += 4;
    if (n > size - at_byte) throw PacketError("an entropy-coded frame runs past the packet");
    const int64_t K = static_cast<int64_t>(idx.size()), per = w <= 4 ? (rows + 1) / 2 : rows;
    const int64_t expect = stream_bytes(K, rows, w), chunks = (expect + kChunk - 1) / kChunk;
    // The frames: each must hold its chunk of the stream, and together they must fill the n bytes.
    std::vector<std::pair<int64_t, int64_t>> frames;  // (offset, compressed size)
    for (int64_t f = 0, off = at_byte; f < chunks; ++f) {
      const int64_t left = at_byte + n - off, want = std::min(kChunk, expect - f * kChunk);
      const size_t len = left > 0 ? ZSTD_findFrameCompressedSize(data + off, static_cast<size_t>(left)) : 0;
      const unsigned long long content = left > 0 && !ZSTD_isError(len) ? ZSTD_getFrameContentSize(data + off, len) : 0;
      if (left <= 0 || ZSTD_isError(len) || content != static_cast<unsigned long long>(want)) {
        throw PacketError("the entropy-coded codes of width " + std::to_string(w) + " are not " +
                          std::to_string(chunks) + " zstd frames of " + std::to_string(expect) + " bytes in all");
      }
      frames.emplace_back(off, static_cast<int64_t>(len));
      off += static_cast<int64_t>(len);
      if (f + 1 == chunks && off != at_byte + n) throw PacketError("bytes left after the entropy-coded frames");
    }
    std::vector<uint8_t> stream(static_cast<size_t>(expect));
    std::vector<const char*> failed(frames.size(), nullptr);  // zstd's reason, per frame
    at::parallel_for(0, chunks, 1, [&](int64_t f0, int64_t f1) {
      for (int64_t f = f0; f < f1; ++f) {
        const size_t want = static_cast<size_t>(std::min(kChunk, expect - f * kChunk));
        const size_t got = ZSTD_decompress(stream.data() + f * kChunk, want, data + frames[f].first,
                                           static_cast<size_t>(frames[f].second));
        if (ZSTD_isError(got) || got != want) failed[f] = ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short";
      }
    });
    for (const char* why : failed)
      if (why) throw PacketError(std::string("the entropy-coded codes do not decompress: ") + why);
    at_byte += n;
    // Back to (rows, C), checking what unpacking a bit stream guarantees by construction: every code
    // fits its width, and an odd row count's padding code is zero.
    const uint8_t top = static_cast<uint8_t>((1 << w) - 1);
    std::atomic<bool> too_wide{false}, padding{false};
    at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
      bool wide = false;
      for (int64_t k = k0; k < k1; ++k) {
        uint8_t* col = cp + idx[k];
        const uint8_t* s = stream.data() + k * per;
        if (w > 4) {
          for (int64_t r = 0; r < rows; ++r) {
            col[r * C] = s[r];
            wide |= s[r] > top;
          }
          continue;
        }
        for (int64_t r = 0; r + 1 < rows; r += 2) {
          const uint8_t lo = s[r / 2] & 15, hi = s[r / 2] >> 4;
          col[r * C] = lo;
          col[(r + 1) * C] = hi;
          wide |= (lo > top) | (hi > top);
        }
        if (rows % 2) {
          col[(rows - 1) * C] = s[rows / 2] & 15;
          wide |= (s[rows / 2] & 15) > top;
          if (s[rows / 2] >> 4) padding = true;
        }
      }
      if (wide) too_wide = true;
    });
    if (padding) throw PacketError("an entropy-coded padding code is not zero");
    if (too_wide) throw PacketError("an entropy-coded code exceeds its width");
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

#include "quant/entropy.h"

#if AMAQ_HAVE_ZSTD
#include <zstd.h>
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "core/error.h"
#include "quant/bitpack.h"
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
// follow different distributions, and one table for all of them costs more than packing) of that
// width's codes, row by row; where the width is at most 4, two consecutive codes of the stream share
// a byte (Huffman spends at least a bit per symbol: on 3-bit codes alone it wastes ~0.4 bit, on
// pairs far less), the last code's partner a zero where their count is odd. The stream goes as
// independent zstd frames of kChunk bytes (the last shorter), compressed and decompressed in
// parallel, preceded by their total size (u32). The chunking does not depend on the thread count.
constexpr int64_t kChunk = int64_t{1} << 20;

int64_t stream_bytes(int64_t codes, int width) {
  return width <= 4 ? (codes + 1) / 2 : codes;
}

// One compression and one decompression context per thread, kept: a context per frame would allocate
// (and fault in) zstd's tables for every frame of every packet.
ZSTD_CCtx* thread_cctx() {
  thread_local const std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> ctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
  return ctx.get();
}
ZSTD_DCtx* thread_dctx() {
  thread_local const std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> ctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  return ctx.get();
}

// The channels of width w, in order.
std::vector<int64_t> channels_of(const uint8_t* bits, int64_t C, int w) {
  std::vector<int64_t> idx;
  for (int64_t c = 0; c < C; ++c)
    if (bits[c] == w) idx.push_back(c);
  return idx;
}

// The codes of the channels idx, row by row, from codes (rows, C) into out (rows, K), or back (to_codes).
void gather(uint8_t* codes, int64_t rows, int64_t C, const std::vector<int64_t>& idx, uint8_t* out, bool to_codes) {
  const int64_t K = static_cast<int64_t>(idx.size());
  // Captured by value: byte stores may alias anything, so values behind references are reloaded each time.
  at::parallel_for(0, rows, 64, [&, K, C, to_codes, codes, out](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        if (to_codes) {
          codes[r * C + idx[k]] = out[r * K + k];
        } else {
          out[r * K + k] = codes[r * C + idx[k]];
        }
      }
    }
  });
}

// The stream's n bytes as independent zstd frames of kChunk bytes (the last shorter), compressed in
// parallel, appended to `out` after their total size (u32).
void compress_stream(const uint8_t* stream, int64_t n, std::string& out) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const size_t slot = ZSTD_compressBound(static_cast<size_t>(std::min(kChunk, n)));
  // Each frame into its own slot of one buffer (no allocation per frame), then appended in order.
  std::unique_ptr<char[]> frames(new char[slot * static_cast<size_t>(chunks)]);
  std::vector<size_t> sizes(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      const size_t len = static_cast<size_t>(std::min(kChunk, n - f * kChunk));
      char* frame = frames.get() + slot * static_cast<size_t>(f);
      ZSTD_CCtx* ctx = thread_cctx();
      const uint8_t* src = stream + f * kChunk;
      const size_t got =
          ctx ? ZSTD_compressCCtx(ctx, frame, slot, src, len, kLevel) : ZSTD_compress(frame, slot, src, len, kLevel);
      sizes[f] = ZSTD_isError(got) ? 0 : got;  // an error: only for lack of memory
    }
  });
  size_t total = 0;
  for (size_t size : sizes) {
    if (size == 0) throw Error("zstd could not compress the codes", "the machine may be out of memory");
    total += size;
  }
  if (total > UINT32_MAX) throw Error("the entropy-coded codes of one width exceed 4 GiB", "send smaller tensors");
  const auto size = static_cast<uint32_t>(total);
  out.reserve(out.size() + sizeof size + total);
  out.append(reinterpret_cast<const char*>(&size), sizeof size);
  for (int64_t f = 0; f < chunks; ++f) out.append(frames.get() + slot * static_cast<size_t>(f), sizes[f]);
}

}  // namespace

std::string entropy_encode(const at::Tensor& codes_in, const at::Tensor& bits_in) {
  const at::Tensor codes = codes_in.to(at::kByte).contiguous(), bits = bits_in.to(at::kCPU, at::kByte).contiguous();
  const int64_t rows = codes.size(0), C = codes.size(1);
  std::string out;
  for (int w = 1; w <= 8; ++w) {
    const std::vector<int64_t> idx = channels_of(bits.data_ptr<uint8_t>(), C, w);
    if (idx.empty()) continue;
    const int64_t K = static_cast<int64_t>(idx.size()), count = rows * K, n = stream_bytes(count, w);
    // Where every channel has this width, the rows are the stream's codes.
    std::vector<uint8_t> picked;
    const uint8_t* flat = codes.data_ptr<uint8_t>();
    if (K < C) {
      picked.resize(static_cast<size_t>(count));
      gather(codes.data_ptr<uint8_t>(), rows, C, idx, picked.data(), false);
      flat = picked.data();
    }
    const std::unique_ptr<uint8_t[]> stream(new uint8_t[static_cast<size_t>(n)]);  // (not zeroed)
    at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
      uint8_t* __restrict s = stream.get();
      const uint8_t* __restrict c = flat;
      if (w > 4) {
        std::memcpy(s + i0, c + i0, static_cast<size_t>(i1 - i0));
        return;
      }
      // (Bounds in locals: byte stores may alias anything, so captured ones would be reloaded each time.)
      const int64_t pairs_end = std::min(i1, count / 2);
      for (int64_t i = i0; i < pairs_end; ++i) s[i] = static_cast<uint8_t>(c[2 * i] | c[2 * i + 1] << 4);
      if (count % 2 && i1 == n) s[n - 1] = c[count - 1];
    });
    compress_stream(stream.get(), n, out);
  }
  return out;
}

std::string entropy_encode_packed(const uint8_t* packed, int64_t size, int64_t rows, const at::Tensor& bits_in) {
  const at::Tensor bits = bits_in.to(at::kCPU, at::kByte).contiguous();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  const int64_t C = bits.numel();
  const int w = C > 0 ? b[0] : 0;
  const bool one_width = std::all_of(b, b + C, [w](uint8_t bw) { return bw == w; });
  if (!one_width || (w != 4 && w != 8)) return entropy_encode(unpack_fast(packed, size, rows, bits), bits);
  // Width 4: the stream's code pairs, the first in the low nibble, are the packed bytes; width 8: the codes.
  TORCH_CHECK(size == stream_bytes(rows * C, w), "expected ", stream_bytes(rows * C, w), " packed bytes, got ", size);
  std::string out;
  compress_stream(packed, size, out);
  return out;
}

at::Tensor entropy_decode(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits_in) {
  const at::Tensor bits = bits_in.to(at::kCPU, at::kByte).contiguous();
  const int64_t C = bits.numel();
  at::Tensor codes = at::empty({rows, C}, at::kByte);
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
    const int64_t K = static_cast<int64_t>(idx.size()), count = rows * K;
    const int64_t expect = stream_bytes(count, w), chunks = (expect + kChunk - 1) / kChunk;
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
    const std::unique_ptr<uint8_t[]> stream(new uint8_t[static_cast<size_t>(expect)]);  // (not zeroed)
    std::vector<const char*> failed(frames.size(), nullptr);                            // zstd's reason, per frame
    at::parallel_for(0, chunks, 1, [&](int64_t f0, int64_t f1) {
      for (int64_t f = f0; f < f1; ++f) {
        const size_t want = static_cast<size_t>(std::min(kChunk, expect - f * kChunk));
        ZSTD_DCtx* ctx = thread_dctx();
        uint8_t* dst = stream.get() + f * kChunk;
        const uint8_t* src = data + frames[f].first;
        const auto len = static_cast<size_t>(frames[f].second);
        const size_t got = ctx ? ZSTD_decompressDCtx(ctx, dst, want, src, len) : ZSTD_decompress(dst, want, src, len);
        if (ZSTD_isError(got) || got != want) failed[f] = ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short";
      }
    });
    for (const char* why : failed)
      if (why) throw PacketError(std::string("the entropy-coded codes do not decompress: ") + why);
    at_byte += n;
    // Back to (rows, C), checking what unpacking a bit stream guarantees by construction: every code
    // fits its width, and an odd count's padding code is zero.
    std::vector<uint8_t> picked(K < C ? static_cast<size_t>(count) : 0);
    uint8_t* flat = K < C ? picked.data() : codes.data_ptr<uint8_t>();
    const uint8_t top = static_cast<uint8_t>((1 << w) - 1);
    const auto over_mask = static_cast<uint8_t>(w > 4 ? ~top : ~(top | top << 4));
    std::atomic<bool> too_wide{false};
    at::parallel_for(0, expect, 1 << 16, [&](int64_t i0, int64_t i1) {
      const uint8_t* __restrict s = stream.get();
      uint8_t* __restrict c = flat;
      if (over_mask) {     // (widths 4 and 8 fill their bytes)
        uint8_t over = 0;  // any bit above the width
        for (int64_t i = i0; i < i1; ++i) over |= s[i] & over_mask;
        if (over) too_wide = true;
      }
      if (w > 4) {
        std::memcpy(c + i0, s + i0, static_cast<size_t>(i1 - i0));
        return;
      }
      const int64_t pairs_end = std::min(i1, count / 2);  // a local: see entropy_encode
      for (int64_t i = i0; i < pairs_end; ++i) {
        c[2 * i] = s[i] & 15;
        c[2 * i + 1] = s[i] >> 4;
      }
    });
    if (w <= 4 && count % 2) {
      if (stream[expect - 1] >> 4) throw PacketError("an entropy-coded padding code is not zero");
      flat[count - 1] = stream[expect - 1] & 15;
    }
    if (too_wide) throw PacketError("an entropy-coded code exceeds its width");
    if (K < C) gather(codes.data_ptr<uint8_t>(), rows, C, idx, flat, true);
  }
  if (at_byte != size) throw PacketError("bytes left after the entropy-coded codes");
  return codes;
}

#else

std::string entropy_encode(const at::Tensor&, const at::Tensor&) {
  throw Error("this build has no libzstd: ec=zstd is not available", "install libzstd-dev and rebuild");
}

std::string entropy_encode_packed(const uint8_t*, int64_t, int64_t, const at::Tensor& bits) {
  return entropy_encode(at::Tensor(), bits);
}

at::Tensor entropy_decode(const uint8_t*, int64_t, int64_t, const at::Tensor&) {
  throw PacketError("an entropy-coded packet, and this build has no libzstd to decode it");
}

#endif

}  // namespace amaq::quant

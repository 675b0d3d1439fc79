// Order-0 range-ANS coding of byte symbols for the entropy-coded scalar quantizer (ecsq.h), by
// htscodecs (the CRAM 3.1 codecs of samtools/htslib; Debian's libhtscodecs): 32 interleaved states
// with 16-bit renormalisation, SIMD encoders and decoders (AVX2 / AVX-512 where the CPU has them,
// chosen at run time; every path writes and reads the same bytes) and a 12-bit frequency table at
// the head of each stream. On 262,144 Gaussian codes it spends about 0.007 bit per symbol above their
// empirical entropy, table included.
//
// A stream from a peer is distrusted: only order-0 streams of exactly the expected length are
// accepted (htscodecs' other methods, RLE, bit packing, striping and order-1, are refused before
// htscodecs sees them), and it is decoded from a padded copy, so that Debian 12's htscodecs 1.3.0,
// whose AVX2 decoder may read up to 8 bytes past its input (fixed upstream in 1.5.2), reads only
// padding.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace amaq::quant::rans {

/// Appends the code of symbols[0, n) (n >= 1) to `out`. Thread-safe.
void encode(const uint8_t* symbols, size_t n, std::string* out);

/// Decodes exactly `n` symbols (n >= 1) from `bytes`; throws PacketError when the bytes are not an
/// order-0 stream of n symbols. Thread-safe. (A damaged stream may also decode to other symbols:
/// htscodecs has no check of its final states.)
void decode(std::string_view bytes, uint8_t* out, size_t n);

}  // namespace amaq::quant::rans

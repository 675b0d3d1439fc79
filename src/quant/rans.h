// A static order-0 range-ANS coder (Duda's asymmetric numeral systems, 64-bit states renormalised
// a 32-bit word at a time, four interleaved) for the entropy-coded scalar quantizer (ecsq.h). It
// codes within a thousandth of a bit of the symbols' empirical entropy, plus its table.
//
// Why not a library: Debian's libzstd exposes only its LZ + Huffman format (ec=zstd), whose
// Huffman stage spends 0.03-0.05 bit per code above the entropy on quantized codes (docs/amaq.md),
// and its FSE stage is not public API; liblzma's adaptive range coder runs at tens of MB/s.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace amaq::quant::rans {

constexpr int kProbBits = 15;
constexpr uint32_t kProbScale = 1u << kProbBits;

/// Frequencies summing to kProbScale in proportion to `counts`; every symbol that occurs gets at
/// least 1, every other 0. At least one count must be nonzero.
std::vector<uint16_t> normalize(const std::vector<uint64_t>& counts);

/// Checks a frequency table read from a peer: at most 65535 symbols, summing to kProbScale. Throws
/// PacketError naming what is wrong.
void check_frequencies(const std::vector<uint16_t>& freqs);

/// Appends the code of `symbols[0, n)` to `out` (each symbol below freqs.size() with a nonzero
/// frequency).
void encode(const uint16_t* symbols, size_t n, const std::vector<uint16_t>& freqs, std::string* out);

/// A decoder for one frequency table.
class Decoder {
 public:
  /// Checks the table (check_frequencies) first.
  explicit Decoder(const std::vector<uint16_t>& freqs);
  /// Decodes `n` symbols from exactly `bytes`; throws PacketError when the bytes are not such a
  /// stream (they run out, are left over, or do not end in the coder's initial state).
  void decode(std::string_view bytes, uint16_t* out, size_t n) const;

 private:
  std::vector<uint16_t> freq_, start_, symbol_of_slot_;
};

}  // namespace amaq::quant::rans

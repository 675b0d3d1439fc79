// Dense bit packing of unsigned codes with a bit-width per channel.
//
// Codes are a (rows, cols) uint8 matrix; channel c uses bits[c] in 1..8. Values are written row by
// row, channel by channel, least significant bit first into a little-endian bit stream with no
// padding between values or rows; the last byte is zero-padded. A row therefore takes
// sum(bits) bits and the whole tensor ceil(rows * sum(bits) / 8) bytes.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace amaq::quant {

/// Bytes that `rows` rows take with the per-channel widths `bits` (cols,) uint8.
int64_t packed_bytes(int64_t rows, const at::Tensor& bits);

/// Reference packer: one bit at a time, obviously correct. codes (rows, cols) uint8.
std::string pack_ref(const at::Tensor& codes, const at::Tensor& bits);
at::Tensor unpack_ref(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits);

/// Fast packer: rows split across threads at byte-aligned row blocks; one width of 1, 2, 4 or 8
/// bits as a flat stream, mixed widths eight channels at a time with BMI2's pext/pdep where the CPU
/// runs them fast (else pack_portable). Writes exactly the bytes pack_ref writes. `out` must hold
/// packed_bytes(rows, bits) bytes.
void pack_fast(const at::Tensor& codes, const at::Tensor& bits, uint8_t* out);
at::Tensor unpack_fast(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits);

/// pack_fast a block of rows at a time, for a producer that writes codes a few rows at a time: the
/// rows [r0, r1) of a (rows, bits.size(0)) tensor, r0 a multiple of 8 (a block then starts on a
/// byte of the stream), whose codes `v` holds (those rows only), become the bytes pack_fast writes
/// for them in `out`, the whole stream's buffer (packed_bytes(rows, bits)). Blocks may be packed
/// in any order and from several threads.
class BlockPacker {
 public:
  BlockPacker(const at::Tensor& bits, int64_t rows);
  ~BlockPacker();
  void pack(const uint8_t* v, int64_t r0, int64_t r1, uint8_t* out) const;

 private:
  struct Plan;
  std::unique_ptr<const Plan> plan_;
};

/// The codes of a (rows, bits.size(0)) tensor produced a block of rows at a time on all threads:
/// `produce(r0, r1, codes)` writes rows [r0, r1), row r at codes + (r - r0) * cols. With `packed`
/// (packed_bytes(rows, bits) bytes), each block goes into a per-thread buffer and is packed while in
/// cache (BlockPacker); otherwise `codes` points into `unpacked` (rows, cols). Blocks start on a
/// multiple of kCodeUnitRows and hold at most kCodeBlockRows. With `only`, exactly those blocks
/// (of an earlier call) are produced again.
constexpr int64_t kCodeUnitRows = 8, kCodeBlockRows = 16;  // a block of 8k rows starts on a byte of the stream
template <typename Produce>
void produce_codes(const at::Tensor& bits, int64_t rows, uint8_t* packed, uint8_t* unpacked, const Produce& produce,
                   const std::vector<std::pair<int64_t, int64_t>>* only = nullptr) {
  const int64_t cols = bits.size(0);
  std::optional<BlockPacker> packer;
  if (packed) packer.emplace(bits, rows);
  const auto run = [&](std::vector<uint8_t>& block, int64_t r0, int64_t r1) {
    if (packed && block.empty()) block.resize(static_cast<size_t>(kCodeBlockRows * cols));
    produce(r0, r1, packed ? block.data() : unpacked + r0 * cols);
    if (packer) packer->pack(block.data(), r0, r1, packed);
  };
  if (only) {
    at::parallel_for(0, static_cast<int64_t>(only->size()), 1, [&](int64_t i0, int64_t i1) {
      std::vector<uint8_t> block;
      for (int64_t i = i0; i < i1; ++i) run(block, (*only)[i].first, (*only)[i].second);
    });
    return;
  }
  at::parallel_for(0, (rows + kCodeUnitRows - 1) / kCodeUnitRows, 1, [&](int64_t u0, int64_t u1) {
    std::vector<uint8_t> block;
    const int64_t begin = u0 * kCodeUnitRows, end = std::min(rows, u1 * kCodeUnitRows);
    for (int64_t r0 = begin; r0 < end; r0 += kCodeBlockRows) run(block, r0, std::min(end, r0 + kCodeBlockRows));
  });
}

/// What pack_fast and unpack_fast run for mixed widths without fast BMI2: one code at a time
/// through a 64-bit accumulator.
void pack_portable(const at::Tensor& codes, const at::Tensor& bits, uint8_t* out);
at::Tensor unpack_portable(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits);

}  // namespace amaq::quant

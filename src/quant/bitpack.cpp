#include "quant/bitpack.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <numeric>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "quant/multiversion.h"

namespace amaq::quant {
namespace {

void check_args(const at::Tensor& bits, int64_t cols) {
  TORCH_CHECK(bits.dim() == 1 && bits.scalar_type() == at::kByte && bits.is_contiguous(), "bits must be (cols,) uint8");
  TORCH_CHECK(bits.size(0) == cols, "bits has ", bits.size(0), " channels, codes have ", cols);
  const uint8_t* b = bits.data_ptr<uint8_t>();
  for (int64_t c = 0; c < cols; ++c)
    TORCH_CHECK(b[c] >= 1 && b[c] <= 8, "bit-width ", int(b[c]), " of channel ", c, " not in 1..8");
}

void check_codes(const at::Tensor& codes, const at::Tensor& bits) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "codes must be contiguous uint8");
  check_args(bits, codes.size(1));
}

void check_size(int64_t size, int64_t rows, const at::Tensor& bits) {
  check_args(bits, bits.size(0));
  const int64_t needed = packed_bytes(rows, bits);
  TORCH_CHECK(size >= needed, "packed data has ", size, " bytes, needs ", needed);
}

int64_t row_bits(const at::Tensor& bits) {
  const uint8_t* b = bits.data_ptr<uint8_t>();
  return std::accumulate(b, b + bits.size(0), int64_t{0});
}

// Runs f(r0, r1) over blocks of rows whose starts are multiples of 8, so that every block begins
// on a byte boundary of the stream whatever the row's bit count.
template <typename F>
void for_row_blocks(int64_t rows, const F& f) {
  const int64_t per_block = std::max<int64_t>(64, (rows / (4 * at::get_num_threads()) + 7) / 8 * 8);
  const int64_t blocks = (rows + per_block - 1) / per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) f(blk * per_block, std::min(rows, (blk + 1) * per_block));
  });
}

// One width b in {1, 2, 4, 8} for every channel: the stream is then the n codes in order, 8 / b to
// a byte, whatever the rows. Bytes [k0, k1) of it.
AMAQ_MULTIVERSION void pack_flat(const uint8_t* v, int64_t n, int b, int64_t k0, int64_t k1, uint8_t* out) {
  const int per = 8 / b;
  const uint8_t mask = static_cast<uint8_t>((1u << b) - 1);
  const int64_t whole = std::min(k1, n / per);
  switch (b) {
    case 8:
      if (whole > k0) std::memcpy(out + k0, v + k0, static_cast<size_t>(whole - k0));
      break;
    case 4:
      for (int64_t k = k0; k < whole; ++k) out[k] = static_cast<uint8_t>((v[2 * k] & 15) | (v[2 * k + 1] & 15) << 4);
      break;
    case 2:
      for (int64_t k = k0; k < whole; ++k)
        out[k] = static_cast<uint8_t>((v[4 * k] & 3) | (v[4 * k + 1] & 3) << 2 | (v[4 * k + 2] & 3) << 4 |
                                      (v[4 * k + 3] & 3) << 6);
      break;
    default:
      for (int64_t k = k0; k < whole; ++k) {
        uint8_t byte = 0;
        for (int j = 0; j < 8; ++j) byte = static_cast<uint8_t>(byte | (v[8 * k + j] & 1) << j);
        out[k] = byte;
      }
  }
  if (whole < k1) {  // the last byte, zero-padded
    uint8_t byte = 0;
    for (int64_t i = whole * per; i < n; ++i)
      byte = static_cast<uint8_t>(byte | (v[i] & mask) << ((i - whole * per) * b));
    out[whole] = byte;
  }
}

AMAQ_MULTIVERSION void unpack_flat(const uint8_t* in, int64_t n, int b, int64_t k0, int64_t k1, uint8_t* v) {
  const int per = 8 / b;
  const uint8_t mask = static_cast<uint8_t>((1u << b) - 1);
  const int64_t whole = std::min(k1, n / per);
  switch (b) {
    case 8:
      if (whole > k0) std::memcpy(v + k0, in + k0, static_cast<size_t>(whole - k0));
      break;
    case 4:
      for (int64_t k = k0; k < whole; ++k) {
        v[2 * k] = in[k] & 15;
        v[2 * k + 1] = static_cast<uint8_t>(in[k] >> 4);
      }
      break;
    case 2:
      for (int64_t k = k0; k < whole; ++k)
        for (int j = 0; j < 4; ++j) v[4 * k + j] = (in[k] >> (2 * j)) & 3;
      break;
    default:
      for (int64_t k = k0; k < whole; ++k)
        for (int j = 0; j < 8; ++j) v[8 * k + j] = (in[k] >> j) & 1;
  }
  if (whole < k1) {
    for (int64_t i = whole * per; i < n; ++i) v[i] = (in[whole] >> ((i - whole * per) * b)) & mask;
  }
}

// The one width of every channel when it is 1, 2, 4 or 8; 0 otherwise.
int flat_width(const at::Tensor& bits) {
  const uint8_t* b = bits.data_ptr<uint8_t>();
  const int64_t n = bits.size(0);
  if (n == 0 || (b[0] != 1 && b[0] != 2 && b[0] != 4 && b[0] != 8)) return 0;
  for (int64_t c = 1; c < n; ++c)
    if (b[c] != b[0]) return 0;
  return b[0];
}

constexpr int64_t kFlatGrain = 1 << 16;  // bytes per task

}  // namespace

int64_t packed_bytes(int64_t rows, const at::Tensor& bits) {
  return (rows * row_bits(bits) + 7) / 8;
}

std::string pack_ref(const at::Tensor& codes, const at::Tensor& bits) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "codes must be (rows, cols) uint8");
  check_args(bits, codes.size(1));
  at::Tensor c = codes.contiguous();
  const int64_t rows = c.size(0), cols = c.size(1);
  std::string out(static_cast<size_t>(packed_bytes(rows, bits)), '\0');
  const uint8_t* v = c.data_ptr<uint8_t>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  int64_t pos = 0;  // bit position in the stream
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) {
      const uint8_t value = v[r * cols + k];
      TORCH_CHECK(b[k] == 8 || value < (1u << b[k]), "code ", int(value), " does not fit in ", int(b[k]), " bits");
      for (int i = 0; i < b[k]; ++i, ++pos) {
        if ((value >> i) & 1) out[pos / 8] = static_cast<char>(out[pos / 8] | (1 << (pos % 8)));
      }
    }
  }
  return out;
}

at::Tensor unpack_ref(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits) {
  check_size(size, rows, bits);
  const int64_t cols = bits.size(0);
  at::Tensor out = at::zeros({rows, cols}, at::kByte);
  uint8_t* v = out.data_ptr<uint8_t>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  int64_t pos = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) {
      uint8_t value = 0;
      for (int i = 0; i < b[k]; ++i, ++pos)
        value = static_cast<uint8_t>(value | (((data[pos / 8] >> (pos % 8)) & 1) << i));
      v[r * cols + k] = value;
    }
  }
  return out;
}

namespace {

// The portable packer and unpacker: one code at a time through a 64-bit accumulator.
void pack_rows_portable(const uint8_t* v, const uint8_t* b, int64_t cols, int64_t r0, int64_t r1, uint8_t* dst,
                        const uint8_t* end) {
  uint64_t acc = 0;
  int fill = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = v + r * cols;
    for (int64_t k = 0; k < cols; ++k) {
      acc |= static_cast<uint64_t>(row[k] & ((1u << b[k]) - 1)) << fill;
      fill += b[k];
      if (fill >= 32) {  // flush four whole bytes
        uint32_t word = static_cast<uint32_t>(acc);
        std::memcpy(dst, &word, 4);
        dst += 4;
        acc >>= 32;
        fill -= 32;
      }
    }
  }
  while (dst < end) {  // the tail: whole bytes, then (only in the last block) the zero-padded final byte
    *dst++ = static_cast<uint8_t>(acc & 0xff);
    acc >>= 8;
  }
}

void unpack_rows_portable(const uint8_t* src, const uint8_t* end, const uint8_t* b, int64_t cols, int64_t r0,
                          int64_t r1, uint8_t* v) {
  uint64_t acc = 0;
  int fill = 0;
  for (int64_t r = r0; r < r1; ++r) {
    uint8_t* row = v + r * cols;
    for (int64_t k = 0; k < cols; ++k) {
      if (fill < b[k]) {  // refill: four bytes when available, else one at a time
        if (end - src >= 4) {
          uint32_t word;
          std::memcpy(&word, src, 4);
          acc |= static_cast<uint64_t>(word) << fill;
          src += 4;
          fill += 32;
        } else {
          while (fill < b[k] && src < end) {
            acc |= static_cast<uint64_t>(*src++) << fill;
            fill += 8;
          }
        }
      }
      row[k] = static_cast<uint8_t>(acc & ((1u << b[k]) - 1));
      acc >>= b[k];
      fill -= b[k];
    }
  }
}

// With BMI2, eight channels at a time: their codes, one per byte of a 64-bit word, are gathered
// into (pext) or scattered from (pdep) their sum(widths) consecutive stream bits by one mask that
// keeps the low bits[c] of each byte. A row's channels are cut into such octets (the last one
// shorter where the channels are not a multiple of 8).
struct Octets {
  std::vector<uint64_t> mask;  // per octet
  std::vector<int> width;      // its bits in the stream
  std::vector<int64_t> start;  // its first bit within a row
  int64_t tail = 8;            // channels in the last octet

  Octets(const uint8_t* b, int64_t cols) {
    int64_t pos = 0;
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
      uint64_t m = 0;
      int w = 0;
      for (int64_t j = 0; j < 8 && c0 + j < cols; ++j) {
        m |= ((uint64_t{1} << b[c0 + j]) - 1) << (8 * j);
        w += b[c0 + j];
      }
      mask.push_back(m);
      width.push_back(w);
      start.push_back(pos);
      pos += w;
      tail = std::min<int64_t>(8, cols - c0);
    }
  }
  int64_t count() const { return static_cast<int64_t>(mask.size()); }
};

#if defined(__x86_64__) && defined(__GNUC__)
#define AMAQ_BMI2 __attribute__((target("bmi2")))

// Rows [r0, r1) packed from dst on (a byte boundary) to end.
AMAQ_BMI2 void pack_rows_bmi2(const uint8_t* v, const Octets& o, int64_t cols, int64_t r0, int64_t r1, uint8_t* dst,
                              const uint8_t* end) {
  const int64_t n = o.count(), tail = o.tail;
  const uint64_t* mask = o.mask.data();
  const int* width = o.width.data();
  uint64_t acc = 0;  // fill < 64 bits pending
  int fill = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = v + r * cols;
    for (int64_t j = 0; j < n; ++j) {
      uint64_t c8 = 0;
      if (j + 1 < n)
        std::memcpy(&c8, row + 8 * j, 8);  // a constant size: one load, not a call
      else
        std::memcpy(&c8, row + 8 * j, static_cast<size_t>(tail));
      const uint64_t bits = _pext_u64(c8, mask[j]);
      acc |= bits << fill;  // fill < 64
      fill += width[j];
      if (fill >= 64) {
        std::memcpy(dst, &acc, 8);
        dst += 8;
        fill -= 64;
        acc = fill ? bits >> (width[j] - fill) : 0;
      }
    }
  }
  while (dst < end) {
    *dst++ = static_cast<uint8_t>(acc & 0xff);
    acc >>= 8;
  }
}

// Rows [r0, r1) from `src`, row r0 beginning at its bit `first_bit`. Every octet's bits are read
// as 16 bytes from its first byte, so the caller keeps 16 readable bytes beyond the last octet's start.
AMAQ_BMI2 void unpack_rows_bmi2(const uint8_t* src, int64_t first_bit, const Octets& o, int64_t cols, int64_t row_bits,
                                int64_t r0, int64_t r1, uint8_t* v) {
  const int64_t n = o.count(), tail = o.tail;
  const uint64_t* mask = o.mask.data();
  const int64_t* start = o.start.data();
  for (int64_t r = r0; r < r1; ++r) {
    uint8_t* row = v + r * cols;
    const int64_t row_pos = first_bit + (r - r0) * row_bits;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = row_pos + start[j];
      unsigned __int128 window;
      std::memcpy(&window, src + (pos >> 3), 16);
      const uint64_t c8 = _pdep_u64(static_cast<uint64_t>(window >> (pos & 7)), mask[j]);
      if (j + 1 < n)
        std::memcpy(row + 8 * j, &c8, 8);
      else
        std::memcpy(row + 8 * j, &c8, static_cast<size_t>(tail));
    }
  }
}

// pdep/pext run in a cycle on Intel since Haswell and AMD since Zen 3; Zen 1 and 2 microcode them
// at tens of cycles or more, slower than the portable loop.
bool fast_bmi2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("bmi2") && !__builtin_cpu_is("znver1") && !__builtin_cpu_is("znver2");
  }();
  return ok;
}
#endif

}  // namespace

namespace {

// The portable paths over checked arguments.
void pack_portable_checked(const uint8_t* v, const at::Tensor& bits, int64_t rows, int64_t cols, uint8_t* out) {
  const int64_t rb = row_bits(bits), total = packed_bytes(rows, bits);
  const uint8_t* b = bits.data_ptr<uint8_t>();
  for_row_blocks(rows, [&](int64_t r0, int64_t r1) {
    // r0 is a multiple of 8, so this block starts at byte (r0 * rb) / 8 exactly.
    pack_rows_portable(v, b, cols, r0, r1, out + (r0 * rb) / 8, out + (r1 == rows ? total : (r1 * rb) / 8));
  });
}

at::Tensor unpack_portable_checked(const uint8_t* data, int64_t rows, const at::Tensor& bits) {
  const int64_t cols = bits.size(0), rb = row_bits(bits), total = packed_bytes(rows, bits);
  at::Tensor out = at::empty({rows, cols}, at::kByte);
  uint8_t* v = out.data_ptr<uint8_t>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  for_row_blocks(rows, [&](int64_t r0, int64_t r1) {
    unpack_rows_portable(data + (r0 * rb) / 8, data + total, b, cols, r0, r1, v);
  });
  return out;
}

}  // namespace

void pack_portable(const at::Tensor& codes, const at::Tensor& bits, uint8_t* out) {
  check_codes(codes, bits);
  pack_portable_checked(codes.data_ptr<uint8_t>(), bits, codes.size(0), codes.size(1), out);
}

at::Tensor unpack_portable(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits) {
  check_size(size, rows, bits);
  return unpack_portable_checked(data, rows, bits);
}

struct BlockPacker::Plan {
  at::Tensor bits;
  int64_t rows, cols, row_bits, total;
  int flat;  // the one width of every channel where it is 1, 2, 4 or 8
#if defined(__x86_64__) && defined(__GNUC__)
  std::unique_ptr<Octets> octets;  // mixed widths with fast BMI2
#endif
};

BlockPacker::BlockPacker(const at::Tensor& bits, int64_t rows) {
  check_args(bits, bits.size(0));
  auto plan = std::make_unique<Plan>();
  plan->bits = bits;
  plan->rows = rows;
  plan->cols = bits.size(0);
  plan->row_bits = row_bits(bits);
  plan->total = packed_bytes(rows, bits);
  plan->flat = flat_width(bits);
#if defined(__x86_64__) && defined(__GNUC__)
  if (!plan->flat && fast_bmi2()) plan->octets = std::make_unique<Octets>(bits.data_ptr<uint8_t>(), plan->cols);
#endif
  plan_ = std::move(plan);
}

BlockPacker::~BlockPacker() = default;

void BlockPacker::pack(const uint8_t* v, int64_t r0, int64_t r1, uint8_t* out) const {
  const Plan& p = *plan_;
  TORCH_CHECK(r0 % 8 == 0 && r0 <= r1 && r1 <= p.rows && (r1 % 8 == 0 || r1 == p.rows),
              "a packed block of rows starts and ends on a multiple of 8 rows (or the last row)");
  // r0 (and r1, unless it is the last row) is a multiple of 8: the block's bytes begin and end on bytes.
  uint8_t* dst = out + (r0 * p.row_bits) / 8;
  uint8_t* end = out + (r1 == p.rows ? p.total : (r1 * p.row_bits) / 8);
  if (p.flat) {
    pack_flat(v, (r1 - r0) * p.cols, p.flat, 0, end - dst, dst);
    return;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if (p.octets) {
    pack_rows_bmi2(v, *p.octets, p.cols, 0, r1 - r0, dst, end);
    return;
  }
#endif
  pack_rows_portable(v, p.bits.data_ptr<uint8_t>(), p.cols, 0, r1 - r0, dst, end);
}

void pack_fast(const at::Tensor& codes, const at::Tensor& bits, uint8_t* out) {
  check_codes(codes, bits);
  const int64_t rows = codes.size(0), cols = codes.size(1);
  const uint8_t* v = codes.data_ptr<uint8_t>();
  if (const int w = flat_width(bits)) {  // split at bytes, not rows
    at::parallel_for(0, packed_bytes(rows, bits), kFlatGrain,
                     [&](int64_t k0, int64_t k1) { pack_flat(v, rows * cols, w, k0, k1, out); });
    return;
  }
  const BlockPacker packer(bits, rows);
  for_row_blocks(rows, [&](int64_t r0, int64_t r1) { packer.pack(v + r0 * cols, r0, r1, out); });
}

at::Tensor unpack_fast(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits) {
  check_size(size, rows, bits);
  const int64_t cols = bits.size(0), rb = row_bits(bits), total = packed_bytes(rows, bits);
  if (const int w = flat_width(bits)) {
    at::Tensor out = at::empty({rows, cols}, at::kByte);
    uint8_t* v = out.data_ptr<uint8_t>();
    at::parallel_for(0, total, kFlatGrain,
                     [&](int64_t k0, int64_t k1) { unpack_flat(data, rows * cols, w, k0, k1, v); });
    return out;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if (fast_bmi2() && rows > 0 && cols > 0) {
    at::Tensor out = at::empty({rows, cols}, at::kByte);
    uint8_t* v = out.data_ptr<uint8_t>();
    const Octets o(bits.data_ptr<uint8_t>(), cols);
    // Rows whose octets all start 16 bytes or more before the stream's end read it in place; the
    // rest from a zero-padded copy of their bytes.
    const int64_t last_start = o.start.back();
    int64_t safe = rows;
    while (safe > 0 && ((safe - 1) * rb + last_start) / 8 + 16 > total) --safe;
    for_row_blocks(safe,
                   [&](int64_t r0, int64_t r1) { unpack_rows_bmi2(data + (r0 * rb) / 8, 0, o, cols, rb, r0, r1, v); });
    if (safe < rows) {
      const int64_t first = (safe * rb) / 8;  // row `safe` begins at bit safe * rb - 8 * first of it
      std::vector<uint8_t> padded(static_cast<size_t>(total - first + 16), 0);
      std::memcpy(padded.data(), data + first, static_cast<size_t>(total - first));
      unpack_rows_bmi2(padded.data(), safe * rb - 8 * first, o, cols, rb, safe, rows, v);
    }
    return out;
  }
#endif
  return unpack_portable_checked(data, rows, bits);
}

}  // namespace amaq::quant

#include "quant/bitpack.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <numeric>

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
  check_args(bits, bits.size(0));
  const int64_t cols = bits.size(0);
  TORCH_CHECK(size >= packed_bytes(rows, bits), "packed data has ", size, " bytes, needs ", packed_bytes(rows, bits));
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

void pack_fast(const at::Tensor& codes, const at::Tensor& bits, uint8_t* out) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "codes must be contiguous uint8");
  check_args(bits, codes.size(1));
  const int64_t rows = codes.size(0), cols = codes.size(1), rb = row_bits(bits);
  const uint8_t* v = codes.data_ptr<uint8_t>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  const int64_t total = packed_bytes(rows, bits);
  if (const int w = flat_width(bits)) {
    at::parallel_for(0, total, kFlatGrain, [&](int64_t k0, int64_t k1) { pack_flat(v, rows * cols, w, k0, k1, out); });
    return;
  }
  for_row_blocks(rows, [&](int64_t r0, int64_t r1) {
    // r0 is a multiple of 8, so this block starts at byte (r0 * rb) / 8 exactly.
    uint8_t* dst = out + (r0 * rb) / 8;
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
    // The tail: whole bytes, then (only in the last block) the zero-padded final byte.
    const uint8_t* end = out + (r1 == rows ? total : (r1 * rb) / 8);
    while (dst < end) {
      *dst++ = static_cast<uint8_t>(acc & 0xff);
      acc >>= 8;
    }
  });
}

at::Tensor unpack_fast(const uint8_t* data, int64_t size, int64_t rows, const at::Tensor& bits) {
  check_args(bits, bits.size(0));
  const int64_t cols = bits.size(0), rb = row_bits(bits);
  TORCH_CHECK(size >= packed_bytes(rows, bits), "packed data has ", size, " bytes, needs ", packed_bytes(rows, bits));
  at::Tensor out = at::empty({rows, cols}, at::kByte);
  uint8_t* v = out.data_ptr<uint8_t>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  const int64_t total = packed_bytes(rows, bits);
  if (const int w = flat_width(bits)) {
    at::parallel_for(0, total, kFlatGrain,
                     [&](int64_t k0, int64_t k1) { unpack_flat(data, rows * cols, w, k0, k1, v); });
    return out;
  }
  for_row_blocks(rows, [&](int64_t r0, int64_t r1) {
    const uint8_t* src = data + (r0 * rb) / 8;
    const uint8_t* end = data + total;
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
  });
  return out;
}

}  // namespace amaq::quant

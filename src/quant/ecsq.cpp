#include "quant/ecsq.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "quant/multiversion.h"
#include "quant/rans.h"

namespace amaq::quant {
namespace {

constexpr int64_t kChunk = int64_t{1} << 18;     // symbols per rANS stream (its table about 100 bytes)
constexpr int64_t kRmsChunk = int64_t{1} << 16;  // values per partial sum of the rms
constexpr int64_t kMaxCode = int64_t{1} << 24;
// Sub-cells per code, for the estimate of the mean of the values that rounded to it: an odd number,
// so that values exactly on a code (zeros) fall in the middle sub-cell, centred on the code.
constexpr int kCells = 15;

// Which codes are byte symbols for `bits` (rANS codes bytes): the `shift` low bits of a code go raw
// (at 7 and 8 bits, where a step is a thirtieth of the RMS and they are all but uniform), the rest,
// the coarse code c >> shift (floor), is a symbol (coarse + K) within [-K, K] and escaped (2K + 1)
// outside.
struct Table {
  int shift;
  int32_t K;
  int32_t escape() const { return 2 * K + 1; }
  // The table's codes, [-K << shift, (K + 1) << shift): code c has index c + (K << shift).
  int32_t codes() const { return (2 * K + 1) << shift; }
  int32_t first() const { return -(K << shift); }
};

Table table_for(int bits) {
  const int shift = std::max(0, bits - 6);
  return {shift, std::min(int32_t{1} << (bits + 1 - shift), int32_t{127})};
}

// A code's reconstruction: the code plus its offset (fp16, within half a step), in steps.
float level_of(int64_t code, c10::Half offset) {
  return static_cast<float>(code) + static_cast<float>(offset);
}

// For x[0, n) at `step`: q = x / step, its code round-half-even(q) (adding 1.5 * 2^23 rounds
// exactly while |q| < 2^22; anything larger lands outside the table). sym[i]: the symbol (escape
// outside the table); cell[i]: for a table code, its index * kCells plus which of its kCells
// sub-cells q lies in, else codes * kCells; low[i] (when shift > 0): the code's low bits (0 for an
// escape). Vectorised (AMAQ_MULTIVERSION).
AMAQ_MULTIVERSION void symbols_run(const float* x, int64_t n, float step, Table t, uint8_t* sym, uint16_t* cell,
                                   uint8_t* low) {
  const float k = static_cast<float>(t.K), unit = 1.0f / static_cast<float>(1 << t.shift);
  const int32_t mask = (1 << t.shift) - 1, offset = -t.first(), outside = t.codes() * kCells;
  for (int64_t i = 0; i < n; ++i) {
    const float q = x[i] / step;
    const float r = (q + 12582912.0f) - 12582912.0f;
    const float coarse = std::floor(r * unit);
    const bool in = coarse >= -k && coarse <= k;
    const float code = in ? r : 0.0f, frac = in ? q - r : 0.0f, top = in ? coarse : 0.0f;
    const int32_t sub = std::min(static_cast<int32_t>((frac + 0.5f) * kCells), kCells - 1);
    sym[i] = static_cast<uint8_t>(in ? static_cast<int32_t>(top) + t.K : t.escape());
    cell[i] = static_cast<uint16_t>(in ? (static_cast<int32_t>(code) + offset) * kCells + sub : outside);
    if (low) low[i] = static_cast<uint8_t>(static_cast<int32_t>(code) & mask);
  }
}

// The sum of x[i]^2 over [0, n) in fp32, in a fixed order (16 running sums, lane j taking every
// i = j mod 16, then added in order), so every CPU version vectorises it to the same result.
AMAQ_MULTIVERSION float sum_squares_run(const float* x, int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * x[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += x[i] * x[i];
  float sum = 0;
  for (float a : acc) sum += a;
  return sum;
}

// out[i] = lut[sym[i]] over [0, n): eight at a time by AVX2's gather where the CPU has it.
__attribute__((target("arch=x86-64-v3"))) void lookup_gather(const uint8_t* sym, int64_t n, const float* lut,
                                                             float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sym + i)));
    _mm256_storeu_ps(out + i, _mm256_i32gather_ps(lut, k, 4));
  }
  for (; i < n; ++i) out[i] = lut[sym[i]];
}

void lookup_run(const uint8_t* sym, int64_t n, const float* lut, float* out) {
  if (lane_width() >= 8) return lookup_gather(sym, n, lut, out);
  for (int64_t i = 0; i < n; ++i) out[i] = lut[sym[i]];
}

// The first i' >= i with sym[i'] >= v, else n: blocks of 64 by their largest (vectorised,
// AMAQ_MULTIVERSION), then the block that has one value by value.
AMAQ_MULTIVERSION int64_t find_at_least(const uint8_t* sym, int64_t i, int64_t n, uint8_t v) {
  for (; i + 64 <= n; i += 64) {
    uint8_t m = 0;
    for (int j = 0; j < 64; ++j) m = std::max(m, sym[i + j]);
    if (m >= v) break;
  }
  for (; i < n; ++i)
    if (sym[i] >= v) return i;
  return n;
}

// The low bits (`shift` each, least significant first) of elements [begin, begin + n) into `bits`.
// Chunks of kChunk start on a byte, so chunks on different threads write different bytes.
void put_low(const uint8_t* low, int64_t begin, int64_t n, int shift, uint8_t* bits) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t at = (begin + i) * shift;
    bits[at >> 3] = static_cast<uint8_t>(bits[at >> 3] | (low[i] << (at & 7)));
  }
}

int32_t get_low(const uint8_t* bits, int64_t i, int shift) {
  const int64_t at = i * shift;
  return (bits[at >> 3] >> (at & 7)) & ((1 << shift) - 1);
}

struct Chunk {
  std::string stream;
  std::vector<uint32_t> cells;   // counts per cell (and the escapes' count last)
  std::vector<int32_t> escapes;  // the escaped codes, in order
  std::vector<uint8_t> sym;      // the symbols, kept for the sender's decoded copy
};

// Room for each table code's value (code index k), and at least 256 entries so that without low
// bits (symbol = code index) a byte symbol indexes it directly.
std::vector<float> values_for(const Table& t) {
  return std::vector<float>(static_cast<size_t>(std::max(t.codes(), int32_t{256})), 0.0f);
}

// The values of elements [begin, begin + len) from their symbols sym[0, len), the packed low bits
// and the chunk's escaped codes esc[0, escapes): symbols past the escape and a count of escapes
// other than the chunk's are refused by name.
void chunk_values(const Table& t, const std::vector<float>& value, const uint8_t* sym, int64_t begin, int64_t len,
                  const uint8_t* low_bits, const int32_t* esc, uint64_t escapes, float step, float* out) {
  if (t.shift) {
    for (int64_t i = 0; i < len; ++i) {
      const int32_t s = sym[i];
      if (s < t.escape()) out[i] = value[(s << t.shift) | get_low(low_bits, begin + i, t.shift)];
    }
  } else {
    lookup_run(sym, len, value.data(), out);  // symbol = code index; 0 past the table
  }
  uint64_t e = 0;
  const auto escape = static_cast<uint8_t>(t.escape());
  for (int64_t i = find_at_least(sym, 0, len, escape); i < len; i = find_at_least(sym, i + 1, len, escape)) {
    if (sym[i] != escape) throw PacketError("ecsq symbol " + std::to_string(sym[i]) + " outside the table");
    if (e == escapes) throw PacketError("an ecsq chunk has more escapes than it declares");
    out[i] = step * static_cast<float>(esc[e++]);
  }
  if (e != escapes) throw PacketError("an ecsq chunk has fewer escapes than it declares");
}

}  // namespace

float ecsq_step(double rms, int bits) {
  if (!(rms > 0)) return 1.0f;
  return static_cast<float>(std::sqrt(2 * M_PI * M_E) * rms * std::ldexp(1.0, -bits));
}

double ecsq_rms(const float* x, int64_t n) {
  if (n == 0) return 0;
  // Per kRmsChunk values its squares in fp32, the chunks summed in order in fp64: the same on any
  // number of threads.
  const int64_t chunks = (n + kRmsChunk - 1) / kRmsChunk;
  std::vector<float> part(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      part[c] = sum_squares_run(x + c * kRmsChunk, std::min(kRmsChunk, n - c * kRmsChunk));
  });
  double sum = 0;
  for (float v : part) sum += v;
  return std::sqrt(sum / static_cast<double>(n));
}

void ecsq_encode(const float* x, int64_t n, float step, int bits, std::string* out, float* decoded) {
  const Table t = table_for(bits);
  ByteWriter w;
  w.put<uint32_t>(static_cast<uint32_t>(t.K));
  if (n == 0) {
    out->append(w.str());
    return;
  }
  const int64_t chunks = (n + kChunk - 1) / kChunk, cells = int64_t{t.codes()} * kCells;
  std::vector<Chunk> chunk(static_cast<size_t>(chunks));
  std::vector<uint8_t> low_bits(t.shift ? static_cast<size_t>((n * t.shift + 7) / 8) : 0, 0);
  // Per chunk: its symbols, their rANS stream, the cells' counts and the escapes' codes (exact).
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    thread_local std::vector<uint8_t> sym, low;  // reused: fresh buffers of this size are page faults
    thread_local std::vector<uint16_t> cell;
    sym.resize(static_cast<size_t>(std::min(kChunk, n)));
    cell.resize(sym.size());
    low.resize(t.shift ? sym.size() : 0);
    for (int64_t c = c0; c < c1; ++c) {
      Chunk& ch = chunk[c];
      const int64_t begin = c * kChunk, len = std::min(n - begin, kChunk);
      symbols_run(x + begin, len, step, t, sym.data(), cell.data(), t.shift ? low.data() : nullptr);
      ch.cells.assign(static_cast<size_t>(cells + 1), 0);
      uint32_t* count = ch.cells.data();
      for (int64_t j = 0; j < len; ++j) ++count[cell[j]];
      const auto escape = static_cast<uint8_t>(t.escape());
      for (int64_t j = find_at_least(sym.data(), 0, len, escape); j < len;
           j = find_at_least(sym.data(), j + 1, len, escape)) {
        const float q = x[begin + j] / step, r = std::nearbyint(q);
        if (!(std::fabs(r) <= static_cast<float>(kMaxCode)))
          throw Error("ecsq: a value is " + std::to_string(q) + " steps from zero",
                      "the step is far too small for this tensor");
        ch.escapes.push_back(static_cast<int32_t>(r));
      }
      rans::encode(sym.data(), static_cast<size_t>(len), &ch.stream);
      if (t.shift) put_low(low.data(), begin, len, t.shift, low_bits.data());
      if (decoded) ch.sym.assign(sym.begin(), sym.begin() + len);
    }
  });
  // Each code's level: the mean of what rounded to it, from its sub-cells' counts (each at its
  // middle; within half a step of the code by construction). The offsets travel as fp16, so the sender
  // decodes with the rounded ones too.
  std::vector<float> value = values_for(t);
  std::vector<c10::Half> offset(static_cast<size_t>(t.codes()), c10::Half(0.0f));
  int64_t lo = 0, hi = -1;  // the codes in use: [lo, hi]
  for (int64_t k = 0; k < t.codes(); ++k) {
    double count = 0, sum = 0;
    for (const Chunk& ch : chunk) {
      for (int j = 0; j < kCells; ++j) {
        const double m = ch.cells[k * kCells + j];
        count += m;
        sum += m * ((j + 0.5) / kCells - 0.5);
      }
    }
    if (count > 0) {
      offset[k] = c10::Half(static_cast<float>(std::clamp(sum / count, -0.5, 0.5)));
      if (hi < lo) lo = k;
      hi = k;
    }
    value[k] = step * level_of(k + t.first(), offset[k]);
  }
  w.put<uint16_t>(static_cast<uint16_t>(lo));
  w.put<uint16_t>(static_cast<uint16_t>(hi + 1));
  for (int64_t k = lo; k <= hi; ++k) w.put(offset[k]);
  w.put<uint32_t>(static_cast<uint32_t>(kChunk));
  size_t total = low_bits.size();
  for (const Chunk& ch : chunk) {
    w.put<uint32_t>(static_cast<uint32_t>(ch.escapes.size()));
    w.put<uint32_t>(static_cast<uint32_t>(ch.stream.size()));
    total += ch.stream.size() + ch.escapes.size() * sizeof(int32_t);
  }
  out->reserve(out->size() + w.str().size() + total);
  out->append(w.str());
  for (const Chunk& ch : chunk)
    out->append(reinterpret_cast<const char*>(ch.escapes.data()), ch.escapes.size() * sizeof(int32_t));
  out->append(reinterpret_cast<const char*>(low_bits.data()), low_bits.size());
  for (const Chunk& ch : chunk) out->append(ch.stream);
  if (!decoded) return;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunk[c];
      chunk_values(t, value, ch.sym.data(), c * kChunk, static_cast<int64_t>(ch.sym.size()), low_bits.data(),
                   ch.escapes.data(), ch.escapes.size(), step, decoded + c * kChunk);
    }
  });
}

void ecsq_decode(ByteReader& r, int64_t n, float step, int bits, float* out) {
  if (bits < 1 || bits > 8) throw PacketError("ecsq target of " + std::to_string(bits) + " bits, not 1..8");
  const Table t = table_for(bits);
  const int64_t K = r.get<uint32_t>("ecsq table size");
  if (K != t.K)
    throw PacketError("ecsq table of " + std::to_string(K) + " codes a side, expected " + std::to_string(t.K));
  if (n == 0) return;
  const int64_t lo = r.get<uint16_t>("ecsq first code"), end = r.get<uint16_t>("ecsq codes end");
  if (lo > end || end > t.codes())
    throw PacketError("ecsq codes [" + std::to_string(lo) + ", " + std::to_string(end) + ") outside the table");
  std::vector<float> value = values_for(t);
  for (int64_t k = 0; k < t.codes(); ++k) {
    c10::Half off(0.0f);
    if (k >= lo && k < end) {
      off = r.get<c10::Half>("ecsq levels");
      if (!(std::fabs(static_cast<float>(off)) <= 0.5f))
        throw PacketError("ecsq level of code " + std::to_string(k + t.first()) + " is not within half a step of it");
    }
    value[k] = step * level_of(k + t.first(), off);
  }
  const int64_t chunk = r.get<uint32_t>("ecsq chunk");
  if (chunk < 1) throw PacketError("ecsq chunk of 0 elements");
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (static_cast<uint64_t>(chunks) > r.remaining() / 8)
    throw PacketError("ecsq chunks of " + std::to_string(chunk) + " elements: " + std::to_string(chunks) +
                      " chunks' sizes do not fit in the packet");
  // Where each chunk's escapes and stream start (the sizes are checked against what is there).
  std::vector<uint64_t> esc_at(chunks + 1, 0), bytes_at(chunks + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    esc_at[c + 1] = esc_at[c] + r.get<uint32_t>("ecsq chunk escapes");
    bytes_at[c + 1] = bytes_at[c] + r.get<uint32_t>("ecsq chunk bytes");
  }
  if (esc_at[chunks] > static_cast<uint64_t>(n)) throw PacketError("more ecsq escapes than elements");
  std::vector<int32_t> esc(esc_at[chunks]);
  const uint8_t* esc_bytes = r.take(esc.size() * sizeof(int32_t), "ecsq escapes");
  if (!esc.empty()) std::memcpy(esc.data(), esc_bytes, esc.size() * sizeof(int32_t));
  for (int32_t k : esc) {
    if ((k >= t.first() && k < t.first() + t.codes()) || k < -kMaxCode || k > kMaxCode)
      throw PacketError("escaped ecsq code " + std::to_string(k) + " is in the table or too large");
  }
  const uint8_t* low = t.shift ? r.take(static_cast<uint64_t>((n * t.shift + 7) / 8), "ecsq low bits") : nullptr;
  const auto* streams = reinterpret_cast<const char*>(r.take(bytes_at[chunks], "ecsq streams"));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    thread_local std::vector<uint8_t> sym;  // reused: fresh buffers of this size are page faults
    sym.resize(static_cast<size_t>(std::min(chunk, n)));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * chunk, len = std::min(n, begin + chunk) - begin;
      rans::decode(std::string_view(streams + bytes_at[c], bytes_at[c + 1] - bytes_at[c]), sym.data(),
                   static_cast<size_t>(len));
      chunk_values(t, value, sym.data(), begin, len, low, esc.data() + esc_at[c], esc_at[c + 1] - esc_at[c], step,
                   out + begin);
    }
  });
}

}  // namespace amaq::quant

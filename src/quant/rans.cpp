#include "quant/rans.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "quant/packet.h"

namespace amaq::quant::rans {
namespace {

// 64-bit states renormalised 32 bits at a time: a state stays in [kLow, 2^32 kLow) between symbols,
// so at most one word moves per symbol (one branch, no loop), and kLow / kProbScale = 2^16 keeps
// the coder's loss far below a thousandth of a bit.
constexpr uint64_t kLow = uint64_t{1} << 31;
constexpr int kStates = 4;  // interleaved states (symbol i uses state i % 4)

// Dividing the state by a symbol's frequency is the encoder's cost: it multiplies by a rounded-up
// reciprocal instead (Alverson's exact integer division by an invariant, the high half of a 64 x 64
// product), which gives x / f exactly for every 64-bit x. A frequency of 1 (the reciprocal would need
// 65 bits) folds the division into the bias: x / 1 = x, x % 1 = 0.
struct EncSymbol {
  uint64_t x_max = 0, rcp = 0;
  uint32_t bias = 0, cmpl = 0;
  int shift = 0;
};

EncSymbol enc_symbol(uint32_t start, uint32_t freq) {
  EncSymbol e;
  e.x_max = ((kLow >> kProbBits) << 32) * freq;
  e.cmpl = kProbScale - freq;
  if (freq == 1) {
    e.rcp = ~uint64_t{0};
    e.shift = 0;
    e.bias = start + kProbScale - 1;
    return e;
  }
  int shift = 0;
  while (freq > (1u << shift)) ++shift;
  e.rcp = static_cast<uint64_t>(((static_cast<unsigned __int128>(1) << (shift + 63)) + freq - 1) / freq);
  e.shift = shift - 1;
  e.bias = start;
  return e;
}

uint64_t mul_hi(uint64_t a, uint64_t b) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
}

}  // namespace

std::vector<uint16_t> normalize(const std::vector<uint64_t>& counts) {
  const uint64_t total = std::accumulate(counts.begin(), counts.end(), uint64_t{0});
  TORCH_INTERNAL_ASSERT(total > 0 && counts.size() <= kProbScale, "rans::normalize: no symbol or too many");
  std::vector<uint16_t> f(counts.size(), 0);
  int64_t sum = 0;
  for (size_t s = 0; s < counts.size(); ++s) {
    if (counts[s] == 0) continue;
    const auto share = static_cast<int64_t>(static_cast<double>(counts[s]) * kProbScale / static_cast<double>(total));
    f[s] = static_cast<uint16_t>(std::clamp<int64_t>(share, 1, kProbScale));
    sum += f[s];
  }
  // Rounding left the sum off by a little: the most frequent symbols absorb it (their relative error is
  // the smallest), never going below 1.
  std::vector<size_t> order(counts.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return counts[a] > counts[b]; });
  for (size_t i = 0; sum != kProbScale; i = (i + 1) % order.size()) {
    uint16_t& v = f[order[i]];
    if (v == 0) {
      i = order.size() - 1;  // past the symbols that occur: start again at the most frequent
      continue;
    }
    if (sum < kProbScale) {
      const int64_t add = kProbScale - sum;
      v = static_cast<uint16_t>(v + add);
      sum += add;
    } else if (v > 1) {
      const int64_t take = std::min<int64_t>(sum - kProbScale, v - 1);
      v = static_cast<uint16_t>(v - take);
      sum -= take;
    }
  }
  return f;
}

void check_frequencies(const std::vector<uint16_t>& freqs) {
  if (freqs.empty() || freqs.size() > 65535)
    throw PacketError("entropy table of " + std::to_string(freqs.size()) + " symbols");
  uint64_t sum = 0;
  for (uint16_t f : freqs) sum += f;
  if (sum != kProbScale)
    throw PacketError("entropy table sums to " + std::to_string(sum) + ", not " + std::to_string(kProbScale));
}

void encode(const uint16_t* symbols, size_t n, const std::vector<uint16_t>& freqs, std::string* out) {
  std::vector<EncSymbol> table(freqs.size());
  for (uint32_t s = 0, c = 0; s < freqs.size(); c += freqs[s], ++s)
    if (freqs[s]) table[s] = enc_symbol(c, freqs[s]);
  // Written back to front into room for the worst case (4 bytes a symbol: a state grows by at most
  // 15 bits per symbol, so a 32-bit word leaves at most once), since the decoder reads front to back.
  // Symbol i goes through state i % kStates: independent chains the decoder can overlap.
  // The room is a per-thread buffer that only grows, not `out` resized (which zero-fills it all).
  const size_t room = 4 * n + 8 * kStates;
  thread_local std::vector<uint8_t> scratch;
  if (scratch.size() < room) scratch.resize(room);
  uint8_t* const first = scratch.data();
  uint8_t* p = first + room;
  auto put = [&](uint64_t & xs, uint16_t sym) __attribute__((always_inline)) {
    const EncSymbol& e = table[sym];
    if (xs >= e.x_max) {
      p -= 4;
      const auto word = static_cast<uint32_t>(xs);
      std::memcpy(p, &word, 4);  // little-endian, as the whole format
      xs >>= 32;
    }
    const uint64_t q = mul_hi(xs, e.rcp) >> e.shift;
    xs += e.bias + q * e.cmpl;
  };
  uint64_t x[kStates] = {kLow, kLow, kLow, kLow};
  static_assert(kStates == 4, "the loops below are written for four states");
  size_t i = n;
  while (i % kStates != 0) {  // the last, incomplete group first: backwards, as everything
    --i;
    put(x[i % kStates], symbols[i]);
  }
  uint64_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
  for (; i >= 4; i -= 4) {
    put(x3, symbols[i - 1]);
    put(x2, symbols[i - 2]);
    put(x1, symbols[i - 3]);
    put(x0, symbols[i - 4]);
  }
  x[0] = x0, x[1] = x1, x[2] = x2, x[3] = x3;
  for (int k = kStates - 1; k >= 0; --k) {
    p -= 8;
    std::memcpy(p, &x[k], 8);
  }
  out->append(reinterpret_cast<const char*>(p), static_cast<size_t>(first + room - p));
}

Decoder::Decoder(const std::vector<uint16_t>& freqs) : freq_(freqs), start_(freqs.size()), symbol_of_slot_(kProbScale) {
  check_frequencies(freqs);
  uint32_t c = 0;
  for (size_t s = 0; s < freqs.size(); ++s) {
    start_[s] = static_cast<uint16_t>(c);
    std::fill_n(symbol_of_slot_.begin() + c, freqs[s], static_cast<uint16_t>(s));
    c += freqs[s];
  }
}

void Decoder::decode(std::string_view bytes, uint16_t* out, size_t n) const {
  if (bytes.size() < 8 * kStates)
    throw PacketError("entropy-coded stream of " + std::to_string(bytes.size()) + " bytes");
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const uint8_t* end = p + bytes.size();
  uint64_t x[kStates];
  for (int k = 0; k < kStates; ++k, p += 8) std::memcpy(&x[k], p, 8);
  const uint16_t* sym_of = symbol_of_slot_.data();
  const uint16_t *freq = freq_.data(), *start = start_.data();
  // One symbol through one state. The four states are separate locals (not x[i % 4], which the
  // compiler keeps in memory) so their dependency chains overlap.
  auto step = [&](uint64_t & xs, size_t i) __attribute__((always_inline)) {
    const auto slot = static_cast<uint32_t>(xs & (kProbScale - 1));
    const uint16_t s = sym_of[slot];
    out[i] = s;
    xs = freq[s] * (xs >> kProbBits) + slot - start[s];
    if (xs < kLow) {
      if (end - p < 4) throw PacketError("entropy-coded stream ends early");
      uint32_t word;
      std::memcpy(&word, p, 4);
      p += 4;
      xs = (xs << 32) | word;
    }
  };
  uint64_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    step(x0, i);
    step(x1, i + 1);
    step(x2, i + 2);
    step(x3, i + 3);
  }
  if (i < n) step(x0, i++);
  if (i < n) step(x1, i++);
  if (i < n) step(x2, i++);
  x[0] = x0, x[1] = x1, x[2] = x2, x[3] = x3;
  for (int k = 0; k < kStates; ++k)
    if (x[k] != kLow) throw PacketError("entropy-coded stream does not end where it should (corrupted?)");
  if (p != end) throw PacketError("entropy-coded stream does not end where it should (corrupted?)");
}

}  // namespace amaq::quant::rans

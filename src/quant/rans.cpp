#include "quant/rans.h"

#include <algorithm>
#include <numeric>

#include "quant/packet.h"

namespace amaq::quant::rans {
namespace {

constexpr uint32_t kLow = 1u << 23;  // the state stays in [kLow, 256 * kLow) between symbols

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
  if (freqs.empty() || freqs.size() > 65535) throw PacketError("entropy table of " + std::to_string(freqs.size()) + " symbols");
  uint64_t sum = 0;
  for (uint16_t f : freqs) sum += f;
  if (sum != kProbScale)
    throw PacketError("entropy table sums to " + std::to_string(sum) + ", not " + std::to_string(kProbScale));
}

void encode(const uint16_t* symbols, size_t n, const std::vector<uint16_t>& freqs, std::string* out) {
  std::vector<uint32_t> start(freqs.size() + 1, 0);
  for (size_t s = 0; s < freqs.size(); ++s) start[s + 1] = start[s] + freqs[s];
  // Written back to front (the decoder reads front to back), then reversed into place.
  std::string rev;
  rev.reserve(n / 2 + 16);
  uint32_t x = kLow;
  for (size_t i = n; i-- > 0;) {
    const uint32_t f = freqs[symbols[i]], c = start[symbols[i]];
    const uint32_t x_max = ((kLow >> kProbBits) << 8) * f;
    while (x >= x_max) {
      rev.push_back(static_cast<char>(x & 0xff));
      x >>= 8;
    }
    x = ((x / f) << kProbBits) + (x % f) + c;
  }
  for (int shift = 24; shift >= 0; shift -= 8) rev.push_back(static_cast<char>((x >> shift) & 0xff));
  out->append(rev.rbegin(), rev.rend());
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
  if (bytes.size() < 4) throw PacketError("entropy-coded stream of " + std::to_string(bytes.size()) + " bytes");
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const uint8_t* end = p + bytes.size();
  uint32_t x = uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
  p += 4;
  for (size_t i = 0; i < n; ++i) {
    const uint32_t slot = x & (kProbScale - 1);
    const uint16_t s = symbol_of_slot_[slot];
    out[i] = s;
    x = freq_[s] * (x >> kProbBits) + slot - start_[s];
    while (x < kLow) {
      if (p == end) throw PacketError("entropy-coded stream ends early");
      x = (x << 8) | *p++;
    }
  }
  if (p != end || x != kLow) throw PacketError("entropy-coded stream does not end where it should (corrupted?)");
}

}  // namespace amaq::quant::rans

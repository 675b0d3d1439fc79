#include "quant/ecsq.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "core/error.h"
#include "quant/multiversion.h"
#include "quant/rans.h"

namespace amaq::quant {
namespace {

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per rANS stream: 8 bytes of overhead each
constexpr int64_t kMaxCode = int64_t{1} << 24;

// A code's reconstruction: the code plus its offset (fp16, within half a step), in steps.
float level_of(int64_t code, c10::Half offset) {
  return static_cast<float>(code) + static_cast<float>(offset);
}

int64_t half_table(int bits) {
  return int64_t{1} << (bits + 1);
}

// What one chunk of the encoder found: per symbol its count and summed distance from its code (in
// steps), and the codes it escaped.
// The symbols of x[0, n) at `step`: round half to even of q = x / step (adding 1.5 * 2^23 rounds
// exactly while |q| < 2^22, and anything larger lands outside the table), code + K for |code| <= K,
// else the escape 2K + 1; resid[i] = q - code for table symbols. Vectorised (AMAQ_MULTIVERSION).
AMAQ_MULTIVERSION void symbols_run(const float* x, int64_t n, float step, int32_t K, uint16_t* sym, float* resid) {
  const int32_t escape = 2 * K + 1;
  const auto limit = static_cast<float>(K);
  for (int64_t i = 0; i < n; ++i) {
    const float q = x[i] / step;
    const float r = (q + 12582912.0f) - 12582912.0f;
    const bool in = (r < 0 ? -r : r) <= limit;
    const float code = in ? r : 0.0f;
    sym[i] = static_cast<uint16_t>(in ? static_cast<int32_t>(code) + K : escape);
    resid[i] = q - code;
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

struct ChunkStats {
  std::vector<uint16_t> symbols;  // kept for the coding pass: 2 bytes an element, not a second division
  std::vector<uint64_t> counts;
  std::vector<double> residual;
  std::vector<int32_t> escapes;
};

}  // namespace

float ecsq_step(double rms, int bits) {
  if (!(rms > 0)) return 1.0f;
  return static_cast<float>(std::sqrt(2 * M_PI * M_E) * rms * std::ldexp(1.0, -bits));
}

double ecsq_rms(const float* x, int64_t n) {
  if (n == 0) return 0;
  // Per chunk of kChunk its squares in fp32, the chunks summed in order in fp64: the same on any
  // number of threads.
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<float> part(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) part[c] = sum_squares_run(x + c * kChunk, std::min(kChunk, n - c * kChunk));
  });
  double sum = 0;
  for (float v : part) sum += v;
  return std::sqrt(sum / static_cast<double>(n));
}

void ecsq_encode(const float* x, int64_t n, float step, int bits, std::string* out, float* decoded) {
  const int64_t K = half_table(bits), symbols = 2 * K + 2, escape = 2 * K + 1;
  const size_t at = out->size();
  ByteWriter w;
  w.put<uint32_t>(static_cast<uint32_t>(K));
  if (n == 0) {
    out->append(w.str());
    return;
  }
  // The symbols of chunk c (symbols_run), and each escape's code, exact.
  auto codes = [&](int64_t c, uint16_t* sym, float* resid, std::vector<int32_t>* escapes) {
    const int64_t begin = c * kChunk, len = std::min(n - begin, kChunk);
    symbols_run(x + begin, len, step, static_cast<int32_t>(K), sym, resid);
    for (int64_t j = 0; j < len; ++j) {
      if (sym[j] != escape) continue;
      const float q = x[begin + j] / step, r = std::nearbyint(q);
      if (!(std::fabs(r) <= static_cast<float>(kMaxCode)))
        throw Error("ecsq: a value is " + std::to_string(q) + " steps from zero",
                    "the step is far too small for this tensor");
      escapes->push_back(static_cast<int32_t>(r));
    }
  };
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<ChunkStats> stats(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> resid(static_cast<size_t>(std::min(kChunk, n)));
    for (int64_t c = c0; c < c1; ++c) {
      ChunkStats& st = stats[c];
      st.counts.assign(symbols, 0);
      st.residual.assign(symbols, 0.0);  // the escape's stays 0
      const int64_t len = std::min(n - c * kChunk, kChunk);
      st.symbols.resize(static_cast<size_t>(len));
      const uint16_t* sym = st.symbols.data();
      codes(c, st.symbols.data(), resid.data(), &st.escapes);
      for (int64_t j = 0; j < len; ++j) {
        ++st.counts[sym[j]];
        st.residual[sym[j]] += static_cast<double>(resid[j]);
      }
    }
  });
  std::vector<uint64_t> counts(symbols, 0);
  std::vector<double> residual(symbols - 1, 0.0);
  for (const ChunkStats& st : stats) {
    for (int64_t s = 0; s < symbols; ++s) counts[s] += st.counts[s];
    for (int64_t s = 0; s + 1 < symbols; ++s) residual[s] += st.residual[s];
  }
  // Each code's level: the mean of what rounded to it (within half a step of the code by construction;
  // clamped so that float rounding of x / step cannot put it outside).
  // The offsets travel as fp16, so the sender decodes with the rounded ones too.
  const std::vector<uint16_t> freqs = rans::normalize(counts);
  std::vector<float> level(symbols - 1);
  std::vector<c10::Half> offset(symbols - 1, c10::Half(0.0f));
  int64_t lo = 0, hi = -1;  // the table symbols in use: [lo, hi]
  for (int64_t s = 0; s + 1 < symbols; ++s) {
    const double mean = counts[s] ? residual[s] / static_cast<double>(counts[s]) : 0.0;
    offset[s] = c10::Half(static_cast<float>(std::clamp(mean, -0.5, 0.5)));
    level[s] = level_of(s - K, offset[s]);
    if (freqs[s] == 0) continue;
    if (hi < lo) lo = s;
    hi = s;
  }
  std::vector<std::string> streams(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk, len = std::min(n - begin, kChunk);
      const uint16_t* sym = stats[c].symbols.data();
      rans::encode(sym, static_cast<size_t>(len), freqs, &streams[c]);
      if (!decoded) continue;
      size_t e = 0;
      for (int64_t j = 0; j < len; ++j) {
        decoded[begin + j] = sym[j] == escape ? step * static_cast<float>(stats[c].escapes[e++]) : step * level[sym[j]];
      }
    }
  });
  w.put<uint16_t>(static_cast<uint16_t>(lo));
  w.put<uint16_t>(static_cast<uint16_t>(hi + 1));
  w.append(freqs.data() + lo, static_cast<size_t>(hi + 1 - lo) * sizeof(uint16_t));
  w.put<uint16_t>(freqs[escape]);
  for (int64_t s = lo; s <= hi; ++s)
    if (freqs[s]) w.put(offset[s]);
  w.put<uint32_t>(static_cast<uint32_t>(kChunk));
  size_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    w.put<uint32_t>(static_cast<uint32_t>(stats[c].escapes.size()));
    w.put<uint32_t>(static_cast<uint32_t>(streams[c].size()));
    total += streams[c].size() + stats[c].escapes.size() * sizeof(int32_t);
  }
  out->reserve(at + w.str().size() + total);
  out->append(w.str());
  for (const ChunkStats& st : stats)
    out->append(reinterpret_cast<const char*>(st.escapes.data()), st.escapes.size() * sizeof(int32_t));
  for (const std::string& s : streams) out->append(s);
}

void ecsq_decode(ByteReader& r, int64_t n, float step, int bits, float* out) {
  if (bits < 1 || bits > 8) throw PacketError("ecsq target of " + std::to_string(bits) + " bits, not 1..8");
  const int64_t K = r.get<uint32_t>("ecsq table size");
  if (K != half_table(bits))
    throw PacketError("ecsq table of " + std::to_string(K) + " codes a side, expected " +
                      std::to_string(half_table(bits)));
  if (n == 0) return;
  const int64_t symbols = 2 * K + 2, escape = 2 * K + 1;
  const int64_t lo = r.get<uint16_t>("ecsq first symbol"), end_sym = r.get<uint16_t>("ecsq symbols end");
  if (lo > end_sym || end_sym > escape)
    throw PacketError("ecsq symbols [" + std::to_string(lo) + ", " + std::to_string(end_sym) + ") outside the table");
  std::vector<uint16_t> freqs(symbols, 0);
  const uint8_t* f = r.take(static_cast<uint64_t>(end_sym - lo) * sizeof(uint16_t), "ecsq frequencies");
  if (end_sym > lo) std::memcpy(freqs.data() + lo, f, static_cast<size_t>(end_sym - lo) * sizeof(uint16_t));
  freqs[escape] = r.get<uint16_t>("ecsq escape frequency");
  const rans::Decoder dec(freqs);
  std::vector<float> level(symbols - 1, 0.0f);
  for (int64_t s = lo; s < end_sym; ++s) {
    if (!freqs[s]) continue;
    const auto off = r.get<c10::Half>("ecsq levels");
    if (!(std::fabs(static_cast<float>(off)) <= 0.5f))
      throw PacketError("ecsq level of code " + std::to_string(s - K) + " is not within half a step of it");
    level[s] = level_of(s - K, off);
  }
  const int64_t chunk = r.get<uint32_t>("ecsq chunk");
  if (chunk < 1) throw PacketError("ecsq chunk of 0 elements");
  const int64_t chunks = (n + chunk - 1) / chunk;
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
    if ((k >= -K && k <= K) || k < -kMaxCode || k > kMaxCode)
      throw PacketError("escaped ecsq code " + std::to_string(k) + " is in the table or too large");
  }
  const auto* streams = reinterpret_cast<const char*>(r.take(bytes_at[chunks], "ecsq streams"));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint16_t> sym(static_cast<size_t>(std::min(chunk, n)));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * chunk, len = std::min(n, begin + chunk) - begin;
      dec.decode(std::string_view(streams + bytes_at[c], bytes_at[c + 1] - bytes_at[c]), sym.data(),
                 static_cast<size_t>(len));
      uint64_t e = esc_at[c];
      for (int64_t i = 0; i < len; ++i) {
        if (sym[i] == escape) {
          if (e == esc_at[c + 1]) throw PacketError("an ecsq chunk has more escapes than it declares");
          out[begin + i] = step * static_cast<float>(esc[e++]);
        } else {
          out[begin + i] = step * level[sym[i]];
        }
      }
      if (e != esc_at[c + 1]) throw PacketError("an ecsq chunk has fewer escapes than it declares");
    }
  });
}

}  // namespace amaq::quant

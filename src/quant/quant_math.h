// The per-element arithmetic of the quantizers, written once for every path: the reference and the
// fast CPU loops (affine.cpp, codec.cpp) and the CUDA kernels (cuda/kernels.cu) include this file.
// Each function is a fixed sequence of IEEE fp32 operations, rounded to nearest, with no fused
// multiply-add (CPU sources build with -ffp-contract=off, the CUDA file with --fmad=false), so
// every path computes the same bits from the same inputs.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define AMAQ_HD __host__ __device__ __forceinline__
#else
#define AMAQ_HD inline
#endif

namespace amaq::quant {

enum class Rounding : uint8_t { kNearest = 0, kStochastic = 1 };

/// Round half to even without libm: exact for |v| < 2^22 (adding 1.5 * 2^23 leaves no fraction bits),
/// so it vectorises and every path rounds alike.
AMAQ_HD float round_half_even(float v) {
  return (v + 12582912.0f) - 12582912.0f;
}

/// The uniform random number in [0, 1) used to stochastically round element `index` under `seed`:
/// splitmix64 of (seed, index), stateless, so every thread and every implementation agrees.
AMAQ_HD float stochastic_uniform(uint64_t seed, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

/// The tensor scale of affine ranges: the power of two that puts max_abs in [2^14, 2^15) (at least
/// 2^-149, fp32's smallest), or 1 for an all-zero tensor. Relative to it the bounds use fp16's whole
/// range: normal (11 significant bits) down to 2^-28 of the largest, none above 32768. A power of
/// two, so that a bound's fp16 relative to it is the bound rounded to 11 significant bits, as
/// relative to any other power of two under which it is a normal fp16 number too: an encoder can
/// round a block's bounds before it has seen the whole tensor.
AMAQ_HD float pow2_scale(float max_abs) {
  if (!(max_abs > 0)) return 1.0f;
  int e = 0;
  frexpf(max_abs, &e);   // max_abs = m * 2^e, m in [0.5, 1)
  const int k = e - 15;  // max_abs / 2^k in [2^14, 2^15)
  return ldexpf(1.0f, k > -149 ? k : -149);
}

/// The one formula for an affine step of b bits over [lo, hi].
AMAQ_HD float step_of(float lo, float hi, int b) {
  return (hi - lo) / static_cast<float>((1 << b) - 1);
}

// max(v, a) and min(v, a) exactly as std::max / std::min evaluate them.
AMAQ_HD float clamp_below(float v, float a) {
  return v < a ? a : v;
}
AMAQ_HD float clamp_above(float v, float a) {
  return a < v ? a : v;
}

/// The affine code of x. Clamping u to [0, qmax] before rounding equals clamping after: the bounds
/// are integers and rounding is monotone. Stochastic: floor(u + r) of a non-negative value is its
/// truncation.
AMAQ_HD uint8_t quantize_one(float x, float lo, float step, int b, Rounding rounding, uint64_t seed, uint64_t index) {
  if (!(step > 0)) return 0;
  const float qmax = static_cast<float>((1 << b) - 1);
  const float u = (x - lo) / step;
  if (rounding == Rounding::kNearest)
    return static_cast<uint8_t>(round_half_even(clamp_above(clamp_below(u, 0.0f), qmax)));
  const float v = clamp_above(clamp_below(u + stochastic_uniform(seed, index), 0.0f), qmax);
  return static_cast<uint8_t>(static_cast<int>(v));
}

AMAQ_HD float dequantize_one(uint8_t code, float lo, float step) {
  return lo + static_cast<float>(code) * step;
}

/// Given v's nearest fp16 (`bits`, whose value is `back`), moves it one fp16 ulp toward -inf
/// (up = false) or +inf (up = true) when needed so that it does not lie above (below) v.
AMAQ_HD uint16_t nudge_half(uint16_t bits, float back, float v, bool up) {
  if (up ? back >= v : back <= v) return bits;
  const bool neg = bits & 0x8000;
  const uint16_t mag = bits & 0x7fff;
  if (mag == 0) return up ? 0x0001 : 0x8001;
  return (up != neg) ? static_cast<uint16_t>(bits + 1) : static_cast<uint16_t>(bits - 1);
}

/// AQ-SGD's symmetric step for a channel whose decoded max-abs is `amax`, with `levels` = 2^(b-1) - 1.
AMAQ_HD float sym_step(float amax, float scale, int levels) {
  return amax * scale / static_cast<float>(levels);
}

/// AQ-SGD's signed level of a delta d, in [-levels, levels]; the code on the wire adds `levels`.
AMAQ_HD float sym_level(float d, float step, int levels) {
  const float L = static_cast<float>(levels);
  return step > 0 ? round_half_even(clamp_above(clamp_below(d / step, -L), L)) : 0.0f;
}

}  // namespace amaq::quant

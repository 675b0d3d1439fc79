#include "quant/affine.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "core/error.h"
#include "quant/bitpack.h"
#include "quant/multiversion.h"
#include "quant/rotation.h"

// The hot loops (AMAQ_MULTIVERSION) keep the reference's arithmetic operation for operation: IEEE
// division, no reciprocal, no fused multiply-add, so every version writes the same bytes. Every
// value is computed, then selected (-fno-trapping-math lets the compiler do that for a select of
// trapping operations; the values are the same IEEE results).
namespace amaq::quant {

namespace {

void half_bounds_generic(float* v, int64_t n, float scale, bool up, uint16_t* bits) {
  for (int64_t g = 0; g < n; ++g) {
    bits[g] = half_bits_rounded(v[g] / scale, up);
    v[g] = half_bits_to_float(bits[g]) * scale;
  }
}

// The same by the F16C instructions (every x86-64-v3 CPU has them), eight values at a time: the same
// round-to-nearest-even as c10::Half's bit arithmetic and __float2half_rn on CUDA (tested against
// c10::Half), then nudge_half's step of one ulp where the rounding went the wrong way.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("arch=x86-64-v3"))) __m128i nudged_halves(__m256 v, bool up) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  const __m256 back = _mm256_cvtph_ps(h);
  // Where back lies above v (below, for up): a 32-bit mask per lane, narrowed to 16 bits.
  const __m256 wrong = up ? _mm256_cmp_ps(back, v, _CMP_NGE_UQ) : _mm256_cmp_ps(back, v, _CMP_NLE_UQ);
  const __m128i move = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(wrong)),
                                       _mm256_extractf128_si256(_mm256_castps_si256(wrong), 1));
  const __m128i negative = _mm_srai_epi16(h, 15);  // all ones where the sign bit is set
  const __m128i zero = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7fff)), _mm_setzero_si128());
  // One ulp away from zero where the value moves away from it (down from a negative, up from a
  // positive), toward it otherwise; from a zero, the smallest subnormal of the direction's sign.
  const __m128i away = up ? _mm_andnot_si128(negative, _mm_set1_epi16(-1)) : negative;
  const __m128i stepped =
      _mm_blendv_epi8(_mm_sub_epi16(h, _mm_set1_epi16(1)), _mm_add_epi16(h, _mm_set1_epi16(1)), away);
  const __m128i from_zero = _mm_set1_epi16(static_cast<int16_t>(up ? 0x0001 : 0x8001));
  return _mm_blendv_epi8(h, _mm_blendv_epi8(stepped, from_zero, zero), move);
}

__attribute__((target("arch=x86-64-v3"))) void half_bounds_f16c(float* v, int64_t n, float scale, bool up,
                                                                uint16_t* bits) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t g = 0;
  for (; g + 8 <= n; g += 8) {
    const __m128i h = nudged_halves(_mm256_div_ps(_mm256_loadu_ps(v + g), s), up);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bits + g), h);
    _mm256_storeu_ps(v + g, _mm256_mul_ps(_mm256_cvtph_ps(h), s));
  }
  half_bounds_generic(v + g, n - g, scale, up, bits + g);
}
#endif

}  // namespace

uint16_t half_bits_rounded(float v, bool up) {
  const c10::Half h(v);  // round to nearest even, as __float2half_rn on CUDA
  return nudge_half(h.x, static_cast<float>(h), v, up);
}

float half_bits_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

void half_bounds(float* v, int64_t n, float scale, bool up, uint16_t* bits) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (lane_width() >= 8) {  // 8 lanes or more: an x86-64-v3 CPU, with F16C
    half_bounds_f16c(v, n, scale, up, bits);
    return;
  }
#endif
  half_bounds_generic(v, n, scale, up, bits);
}

namespace {

void check_input(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "expected contiguous fp32 (rows, cols)");
  TORCH_CHECK(x.size(0) == layout.rows && x.size(1) == layout.cols, "layout does not match x");
  TORCH_CHECK(bits.numel() == layout.cols && bits.scalar_type() == at::kByte, "bits must be (cols,) uint8");
  TORCH_CHECK(layout.granularity != Granularity::kGroup || layout.group > 0, "group size must be positive");
}

}  // namespace

void throw_non_finite(int64_t bad, int64_t n, int64_t first) {
  throw Error("tensor to encode has " + std::to_string(bad) + " NaN/Inf values of " + std::to_string(n) +
                  " (first at flat index " + std::to_string(first) + ")",
              "training diverged: lower the learning rate, enable gradient clipping, or check the input data");
}

// L lanes as GCC vector types (multiversion.h): each version runs as many as its registers hold. A
// lane computes exactly what the scalar code computes on its share of the elements.

template <int L>
AMAQ_LANES_INLINE float max_abs_run_lanes(const float* p, int64_t n, int64_t* non_finite) {
  using F = typename Lanes<L>::F;
  using I = typename Lanes<L>::I;
  const I magnitude = I{} + 0x7fffffff;
  const F largest = F{} + std::numeric_limits<float>::max();
  F m = {};
  I bad = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    I v;
    std::memcpy(&v, p + i, sizeof v);
    const F a = reinterpret_cast<F>(v & magnitude);  // |v|
    m = a > m ? a : m;
    bad -= ~(a <= largest);  // +1 where NaN or Inf (a comparison is -1 where true)
  }
  float r = 0.0f;
  int64_t nb = 0;
  for (int j = 0; j < L; ++j) {
    r = m[j] > r ? m[j] : r;
    nb += bad[j];
  }
  for (; i < n; ++i) {
    const float a = std::fabs(p[i]);
    r = a > r ? a : r;
    nb += !(a <= std::numeric_limits<float>::max());
  }
  *non_finite = nb;
  return r;
}
AMAQ_LANE_VERSIONS(float, max_abs_run, (const float* p, int64_t n, int64_t* non_finite), (p, n, non_finite))

namespace {

// min and max of p[0, n) (NaN ignored), exactly as the sequential `v < mn ? v : mn` and
// `v > mx ? v : mx` from +-inf find them: lane by lane, then, where the result is a zero (whose
// sign depends on which zero came first), again in order; and how many values are NaN or Inf.
template <int L>
AMAQ_LANES_INLINE void range_run_lanes(const float* p, int64_t n, float* lo, float* hi, int64_t* non_finite) {
  using F = typename Lanes<L>::F;
  using I = typename Lanes<L>::I;
  constexpr float inf = std::numeric_limits<float>::infinity();
  const I magnitude = I{} + 0x7fffffff;
  const F largest = F{} + std::numeric_limits<float>::max();
  F mn = F{} + inf, mx = F{} - inf;
  I bad = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    I bits;
    std::memcpy(&bits, p + i, sizeof bits);
    const F v = reinterpret_cast<F>(bits);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    bad -= ~(reinterpret_cast<F>(bits & magnitude) <= largest);  // +1 where NaN or Inf
  }
  float a = inf, b = -inf;
  int64_t nb = 0;
  for (int j = 0; j < L; ++j) {
    a = mn[j] < a ? mn[j] : a;
    b = mx[j] > b ? mx[j] : b;
    nb += bad[j];
  }
  for (; i < n; ++i) {
    a = p[i] < a ? p[i] : a;
    b = p[i] > b ? p[i] : b;
    nb += !(std::fabs(p[i]) <= std::numeric_limits<float>::max());
  }
  if (a == 0.0f || b == 0.0f) {
    a = inf, b = -inf;
    for (i = 0; i < n; ++i) {
      a = p[i] < a ? p[i] : a;
      b = p[i] > b ? p[i] : b;
    }
  }
  *lo = a, *hi = b;
  *non_finite = nb;
}

// range_run of each group of `group` values in p[0, n) (the last one shorter where group does not
// divide n) into lo[g], hi[g]: one call per row, not per group; the NaN/Inf count of them all.
template <int L>
AMAQ_LANES_INLINE void range_groups_lanes(const float* p, int64_t n, int64_t group, float* lo, float* hi,
                                          int64_t* non_finite) {
  int64_t bad = 0;
  for (int64_t c0 = 0, g = 0; c0 < n; c0 += group, ++g) {
    int64_t nb = 0;
    range_run_lanes<L>(p + c0, std::min(group, n - c0), lo + g, hi + g, &nb);
    bad += nb;
  }
  *non_finite = bad;
}
AMAQ_LANE_VERSIONS(void, range_groups,
                   (const float* p, int64_t n, int64_t group, float* lo, float* hi, int64_t* non_finite),
                   (p, n, group, lo, hi, non_finite))

// dequantize_one of codes[0, n) in range [lo, hi].
AMAQ_LANES_INLINE void dequantize_mixed(const uint8_t* codes, const float* levels, int64_t n, float lo, float hi,
                                        float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float step = (hi - lo) / levels[i];
    out[i] = lo + static_cast<float>(codes[i]) * step;
  }
}
AMAQ_MULTIVERSION void dequantize_run(const uint8_t* codes, const float* levels, int64_t n, float lo, float hi,
                                      float* out) {
  dequantize_mixed(codes, levels, n, lo, hi, out);
}

// The same where every channel has the same width: one step, no division per element.
AMAQ_LANES_INLINE void dequantize_uniform(const uint8_t* codes, float level, int64_t n, float lo, float hi,
                                          float* out) {
  const float step = (hi - lo) / level;
  for (int64_t i = 0; i < n; ++i) out[i] = lo + static_cast<float>(codes[i]) * step;
}
AMAQ_MULTIVERSION void dequantize_run_uniform(const uint8_t* codes, float level, int64_t n, float lo, float hi,
                                              float* out) {
  dequantize_uniform(codes, level, n, lo, hi, out);
}

// quantize_one's nearest rounding of u = (x - lo) / step into [0, level] (inlined into the loops below).
inline uint8_t nearest_code_of(float u, float step, float level) {
  const float below = u < 0.0f ? 0.0f : u;
  const float v = level < below ? level : below;
  const float rounded = (v + 12582912.0f) - 12582912.0f;  // round_half_even
  return static_cast<uint8_t>(static_cast<int32_t>(step > 0 ? rounded : 0.0f));
}
inline uint8_t nearest_code(float x, float lo, float step, float level) {
  return nearest_code_of((x - lo) / step, step, level);
}

// Nearest-rounding codes of p[0, n), channel i with levels[i] = 2^bits - 1, all in range [lo, hi]:
// quantize_one's arithmetic; and, when `decoded` is given, dequantize_one's of each code.
AMAQ_LANES_INLINE void quantize_mixed(const float* p, const float* levels, int64_t n, float lo, float hi,
                                      uint8_t* codes, float* decoded) {
  for (int64_t i = 0; i < n; ++i) codes[i] = nearest_code(p[i], lo, (hi - lo) / levels[i], levels[i]);
  if (decoded) dequantize_mixed(codes, levels, n, lo, hi, decoded);
}

// The same where every channel has `level` levels: the step computed once (the same IEEE quotient),
// which halves the divisions, the loop's bound.
AMAQ_LANES_INLINE void quantize_uniform(const float* p, float level, int64_t n, float lo, float hi, uint8_t* codes,
                                        float* decoded) {
  const float step = (hi - lo) / level;
  for (int64_t i = 0; i < n; ++i) codes[i] = nearest_code(p[i], lo, step, level);
  if (decoded) dequantize_uniform(codes, level, n, lo, hi, decoded);
}

// AMAQ's gate gradient term of a code and its u = (x - lo) / step (fake_quant): (code - u) * dstep/db
// with dstep/db = -step ln2 2^b / (2^b - 1), 0 where the step is 0; each operation as fake_quant's
// tensor operations compute it (their float ln2 included).
inline float gate_slope_of(float u, uint8_t code, float step, float level) {
  constexpr float kLn2 = static_cast<float>(0.69314718055994530942);
  const float residual = step > 0 ? static_cast<float>(code) - u : 0.0f;
  const float pow2 = level + 1.0f;  // 2^b, exactly
  return residual * ((((-step) * kLn2) * pow2) / level);
}

// quantize_uniform's (Uniform: every channel `level` levels) or quantize_mixed's codes with each
// value's gate_slope_of, both from one u.
template <bool Uniform>
AMAQ_LANES_INLINE void quantize_with_slope(const float* p, float level, const float* levels, int64_t n, float lo,
                                           float hi, uint8_t* codes, float* slope) {
  const float uniform_step = Uniform ? (hi - lo) / level : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float lv = Uniform ? level : levels[i];
    const float step = Uniform ? uniform_step : (hi - lo) / lv;
    const float u = (p[i] - lo) / step;
    codes[i] = nearest_code_of(u, step, lv);
    slope[i] = gate_slope_of(u, codes[i], step, lv);
  }
}

// Both over the groups of `group` values of p[0, n) (the last one shorter where group does not
// divide n), group g in range [lo[g], hi[g]]: one call per row, not per group. `level` > 0: every
// channel has that many levels; else channel c has levels[c]. With `slope`, each value's
// gate_slope_of too.
AMAQ_MULTIVERSION void quantize_groups(const float* p, int64_t n, int64_t group, float level, const float* levels,
                                       const float* lo, const float* hi, uint8_t* codes, float* decoded, float* slope) {
  for (int64_t c0 = 0, g = 0; c0 < n; c0 += group, ++g) {
    const int64_t m = std::min(group, n - c0);
    float* d = decoded ? decoded + c0 : nullptr;
    if (slope) {
      float* sl = slope + c0;
      if (level > 0)
        quantize_with_slope<true>(p + c0, level, nullptr, m, lo[g], hi[g], codes + c0, sl);
      else
        quantize_with_slope<false>(p + c0, 0.0f, levels + c0, m, lo[g], hi[g], codes + c0, sl);
      if (d && level > 0)
        dequantize_uniform(codes + c0, level, m, lo[g], hi[g], d);
      else if (d)
        dequantize_mixed(codes + c0, levels + c0, m, lo[g], hi[g], d);
    } else if (level > 0) {
      quantize_uniform(p + c0, level, m, lo[g], hi[g], codes + c0, d);
    } else {
      quantize_mixed(p + c0, levels + c0, m, lo[g], hi[g], codes + c0, d);
    }
  }
}

// The largest |v[i]| and the smallest nonzero one of v[0, n) into *max_abs and *min_nonzero (which
// hold the running values), without a branch per value.
void block_magnitudes(const float* v, int64_t n, float* max_abs, float* min_nonzero) {
  float mx = *max_abs, mn = *min_nonzero;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(v[i]);
    mx = a > mx ? a : mx;
    mn = a > 0.0f && a < mn ? a : mn;
  }
  *max_abs = mx;
  *min_nonzero = mn;
}

// The one level count of every channel, or 0 where the widths differ.
float uniform_level(const std::vector<float>& levels) {
  for (const float l : levels)
    if (l != levels.front()) return 0.0f;
  return levels.empty() ? 0.0f : levels.front();
}

// 2^bits - 1 per channel, as step_of divides by it.
std::vector<float> levels_of(const uint8_t* b, int64_t cols) {
  std::vector<float> l(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) l[c] = static_cast<float>((1 << b[c]) - 1);
  return l;
}

}  // namespace

float checked_max_abs(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "checked_max_abs takes contiguous fp32");
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  const int64_t chunk = 1 << 16, chunks = (n + chunk - 1) / chunk;
  std::vector<float> part(chunks, 0.0f);
  std::vector<int64_t> bad(chunks, 0), first(chunks, -1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * chunk, i1 = std::min(n, i0 + chunk);
      int64_t nb = 0;
      part[c] = max_abs_run(p + i0, i1 - i0, &nb);
      bad[c] = nb;
      if (nb) {
        for (int64_t i = i0; i < i1 && first[c] < 0; ++i)
          if (!std::isfinite(p[i])) first[c] = i;
      }
    }
  });
  int64_t total_bad = 0, first_bad = -1;
  float m = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    m = std::max(m, part[c]);
    total_bad += bad[c];
    if (first_bad < 0 && first[c] >= 0) first_bad = first[c];
  }
  if (total_bad > 0) throw_non_finite(total_bad, n, first_bad);
  return m;
}

AffineQuant affine_quantize_ref(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout,
                                Rounding rounding, uint64_t seed) {
  check_input(x, bits, layout);
  const int64_t rows = layout.rows, cols = layout.cols, G = layout.num_groups();
  const float* xp = x.data_ptr<float>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  float max_abs = 0;
  for (int64_t i = 0; i < rows * cols; ++i) max_abs = std::max(max_abs, std::fabs(xp[i]));
  AffineQuant q;
  q.scale = pow2_scale(max_abs);
  std::vector<float> mn(G, std::numeric_limits<float>::infinity()), mx(G, -std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = layout.group_of(r, c);
      mn[g] = std::min(mn[g], xp[r * cols + c]);
      mx[g] = std::max(mx[g], xp[r * cols + c]);
    }
  }
  q.lo = at::empty({G}, at::kHalf);
  q.hi = at::empty({G}, at::kHalf);
  auto* lo16 = reinterpret_cast<uint16_t*>(q.lo.data_ptr());
  auto* hi16 = reinterpret_cast<uint16_t*>(q.hi.data_ptr());
  for (int64_t g = 0; g < G; ++g) {
    lo16[g] = half_bits_rounded(mn[g] / q.scale, /*up=*/false);
    hi16[g] = half_bits_rounded(mx[g] / q.scale, /*up=*/true);
  }
  q.codes = at::empty({rows, cols}, at::kByte);
  uint8_t* out = q.codes.data_ptr<uint8_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = layout.group_of(r, c);
      const float lo = half_bits_to_float(lo16[g]) * q.scale, hi = half_bits_to_float(hi16[g]) * q.scale;
      out[r * cols + c] = quantize_one(xp[r * cols + c], lo, step_of(lo, hi, b[c]), b[c], rounding, seed,
                                       static_cast<uint64_t>(r * cols + c));
    }
  }
  return q;
}

at::Tensor affine_dequantize_ref(const AffineQuant& q, const at::Tensor& bits, const AffineLayout& layout) {
  const int64_t rows = layout.rows, cols = layout.cols;
  at::Tensor out = at::empty({rows, cols}, at::kFloat);
  float* o = out.data_ptr<float>();
  const uint8_t* codes = q.codes.data_ptr<uint8_t>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  const auto* lo16 = reinterpret_cast<const uint16_t*>(q.lo.data_ptr());
  const auto* hi16 = reinterpret_cast<const uint16_t*>(q.hi.data_ptr());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = layout.group_of(r, c);
      const float lo = half_bits_to_float(lo16[g]) * q.scale, hi = half_bits_to_float(hi16[g]) * q.scale;
      o[r * cols + c] = dequantize_one(codes[r * cols + c], lo, step_of(lo, hi, b[c]));
    }
  }
  return out;
}

namespace {

// Decoded fp32 range starts and ends per group.
void decoded_ranges(const AffineQuant& q, std::vector<float>& lo, std::vector<float>& hi) {
  const int64_t G = q.lo.numel();
  lo.resize(G);
  hi.resize(G);
  const auto* lo16 = reinterpret_cast<const uint16_t*>(q.lo.data_ptr());
  const auto* hi16 = reinterpret_cast<const uint16_t*>(q.hi.data_ptr());
  for (int64_t g = 0; g < G; ++g) {
    lo[g] = half_bits_to_float(lo16[g]) * q.scale;
    hi[g] = half_bits_to_float(hi16[g]) * q.scale;
  }
}

// Calls f(r, c0, c1, g) for each run of columns [c0, c1) of row r that share range group g.
template <typename F>
inline void for_row_groups(const AffineLayout& L, int64_t r, const F& f) {
  switch (L.granularity) {
    case Granularity::kToken:
      f(r, 0, L.cols, r);
      break;
    case Granularity::kGroup:
      for (int64_t c0 = 0, gi = 0; c0 < L.cols; c0 += L.group, ++gi)
        f(r, c0, std::min(L.cols, c0 + L.group), r * L.groups_per_row() + gi);
      break;
    case Granularity::kChannel:
      f(r, 0, L.cols, -1);
      break;  // group = column
  }
}

}  // namespace

namespace {

// Rotating in place needs range groups of the rotation's size, a power of two dividing the channels.
void check_rotation_layout(const AffineLayout& layout, int64_t block) {
  TORCH_CHECK(layout.granularity == Granularity::kGroup && layout.group == block && is_power_of_two(block) &&
                  layout.cols % block == 0,
              "a rotated encoding or decoding needs power-of-two groups of the rotation's size");
}

}  // namespace

AffineQuant affine_quantize(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout, Rounding rounding,
                            uint64_t seed, at::Tensor* decoded, int64_t rotation_block, uint8_t* packed,
                            at::Tensor* gate_slope) {
  check_input(x, bits, layout);
  const int64_t rows = layout.rows, cols = layout.cols, G = layout.num_groups();
  const float* xp = x.data_ptr<float>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  AffineQuant q;
  q.lo = at::empty({G}, at::kHalf);
  q.hi = at::empty({G}, at::kHalf);
  auto* lo16 = reinterpret_cast<uint16_t*>(q.lo.data_ptr());
  auto* hi16 = reinterpret_cast<uint16_t*>(q.hi.data_ptr());
  if (rotation_block > 0) {
    check_rotation_layout(layout, rotation_block);
    TORCH_CHECK(rounding == Rounding::kNearest, "a rotated encoding rounds to nearest");
  }

  if (rotation_block > 0 || (rounding == Rounding::kNearest && layout.granularity != Granularity::kChannel)) {
    // One pass over x, a block of rows at a time while it is in cache: each group's range (of the
    // group rotated, with a rotation, rotated once into a per-thread buffer) and the NaN/Inf count,
    // the fp16 bounds, the codes and the decoded values. The bounds are relative to the tensor's
    // scale, a power of two known only at the end; relative to any power of two under which a
    // bound is a normal fp16 number it rounds alike (pow2_scale), so each block rounds relative to
    // its own and the fp16 numbers are re-expressed at the end (exactly). A block with a nonzero
    // bound below fp16's normal range relative to the tensor's scale (groups 2^28 times smaller
    // than the tensor's largest |value|) is encoded again once the scale is known.
    std::vector<float> lo(static_cast<size_t>(G)), hi(static_cast<size_t>(G));
    const int64_t group = layout.granularity == Granularity::kToken ? cols : layout.group;
    const int64_t per_row = layout.groups_per_row();
    const std::vector<float> levels = levels_of(b, cols);
    const float uniform = uniform_level(levels);
    float* dp = nullptr;
    if (decoded) {
      *decoded = at::empty({rows, cols}, at::kFloat);
      dp = decoded->data_ptr<float>();
    }
    if (!packed) q.codes = at::empty({rows, cols}, at::kByte);
    float* sp = nullptr;
    if (gate_slope) {
      *gate_slope = at::empty({rows, cols}, at::kFloat);
      sp = gate_slope->data_ptr<float>();
    }
    struct Block {      // indexed by r0 / kCodeUnitRows
      int64_t r1 = -1;  // -1: no block starts there
      float max_abs = 0.0f, min_nonzero = std::numeric_limits<float>::infinity();
      int64_t bad = 0;
    };
    std::vector<Block> blocks(static_cast<size_t>((rows + kCodeUnitRows - 1) / kCodeUnitRows));
    float final_scale = 0.0f;  // the tensor's, once known; 0: each block's own
    const auto encode_block = [&](int64_t r0, int64_t r1, uint8_t* codes) {
      thread_local std::vector<float> rotated;
      if (rotation_block > 0) rotated.resize(static_cast<size_t>(kCodeBlockRows * cols));
      const auto values = [&](int64_t r) {
        return rotation_block > 0 ? rotated.data() + (r - r0) * cols : xp + r * cols;
      };
      Block& k = blocks[r0 / kCodeUnitRows];
      k = Block{r1};
      for (int64_t r = r0; r < r1; ++r) {
        if (rotation_block > 0)
          hadamard_blocks(xp + r * cols, rotated.data() + (r - r0) * cols, cols / rotation_block, rotation_block);
        int64_t nb = 0;
        range_groups(values(r), cols, group, lo.data() + r * per_row, hi.data() + r * per_row, &nb);
        k.bad += nb;
      }
      const int64_t g0 = r0 * per_row, n = (r1 - r0) * per_row;
      block_magnitudes(lo.data() + g0, n, &k.max_abs, &k.min_nonzero);
      block_magnitudes(hi.data() + g0, n, &k.max_abs, &k.min_nonzero);
      const float scale = final_scale > 0 ? final_scale : pow2_scale(k.max_abs);
      half_bounds(lo.data() + g0, n, scale, /*up=*/false, lo16 + g0);  // lo and hi now the decoded bounds
      half_bounds(hi.data() + g0, n, scale, /*up=*/true, hi16 + g0);
      for (int64_t r = r0; r < r1; ++r) {
        float* d = dp ? dp + r * cols : nullptr;
        quantize_groups(values(r), cols, group, uniform, levels.data(), lo.data() + r * per_row,
                        hi.data() + r * per_row, codes + (r - r0) * cols, d, sp ? sp + r * cols : nullptr);
        if (d && rotation_block > 0) hadamard_blocks(d, d, cols / rotation_block, rotation_block);
      }
    };
    uint8_t* unpacked = packed ? nullptr : q.codes.data_ptr<uint8_t>();
    produce_codes(bits, rows, packed, unpacked, encode_block);
    float max_abs = 0.0f;
    int64_t bad = 0;
    for (const Block& k : blocks) {
      max_abs = std::max(max_abs, k.max_abs);
      bad += k.bad;
    }
    if (bad > 0) {  // NaN/Inf in x (checked_max_abs throws, naming them), or else the rotation overflowed
      checked_max_abs(x);
      throw Error("rotating the tensor's channel groups overflowed fp32 (values near 3.4e38)",
                  "scale the activations down, or drop rot=hadamard");
    }
    q.scale = pow2_scale(max_abs);
    const float smallest_normal = std::ldexp(q.scale, -14);  // fp16's smallest normal relative to the scale
    std::vector<std::pair<int64_t, int64_t>> again;
    for (int64_t u = 0; u < static_cast<int64_t>(blocks.size()); ++u) {
      const Block& k = blocks[u];
      if (k.r1 < 0) continue;
      const int64_t r0 = u * kCodeUnitRows;
      if (k.min_nonzero < smallest_normal) {
        again.emplace_back(r0, k.r1);
        continue;
      }
      // Its decoded bounds are normal fp16 numbers times its own power of two: relative to the
      // tensor's scale they are fp16 numbers exactly, and stay what they are.
      const int64_t g0 = r0 * per_row, n = (k.r1 - r0) * per_row;
      half_bounds(lo.data() + g0, n, q.scale, /*up=*/false, lo16 + g0);
      half_bounds(hi.data() + g0, n, q.scale, /*up=*/true, hi16 + g0);
    }
    if (!again.empty()) {
      final_scale = q.scale;
      produce_codes(bits, rows, packed, unpacked, encode_block, &again);
    }
    return q;
  }

  q.scale = pow2_scale(checked_max_abs(x));
  const float scale = q.scale;
  q.codes = at::empty({rows, cols}, at::kByte);
  uint8_t* out = q.codes.data_ptr<uint8_t>();
  // Ranges.
  if (layout.granularity == Granularity::kChannel) {
    at::Tensor mn = x.amin(0), mx = x.amax(0);  // exact reductions
    const float* mnp = mn.data_ptr<float>();
    const float* mxp = mx.data_ptr<float>();
    for (int64_t c = 0; c < cols; ++c) {
      lo16[c] = half_bits_rounded(mnp[c] / scale, false);
      hi16[c] = half_bits_rounded(mxp[c] / scale, true);
    }
  } else {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for_row_groups(layout, r, [&](int64_t row, int64_t c0, int64_t c1, int64_t g) {
          const float* p = xp + row * cols;
          float mn = std::numeric_limits<float>::infinity(), mx = -mn;
          for (int64_t c = c0; c < c1; ++c) {
            mn = std::min(mn, p[c]);
            mx = std::max(mx, p[c]);
          }
          lo16[g] = half_bits_rounded(mn / scale, false);
          hi16[g] = half_bits_rounded(mx / scale, true);
        });
      }
    });
  }
  std::vector<float> lo, hi;
  decoded_ranges(q, lo, hi);

  // Codes.
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for_row_groups(layout, r, [&](int64_t row, int64_t c0, int64_t c1, int64_t g) {
        const float* p = xp + row * cols;
        uint8_t* o = out + row * cols;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t gg = g < 0 ? c : g;
          o[c] = quantize_one(p[c], lo[gg], step_of(lo[gg], hi[gg], b[c]), b[c], rounding, seed,
                              static_cast<uint64_t>(row * cols + c));
        }
      });
    }
  });
  if (decoded) *decoded = affine_dequantize(q, bits, layout);
  if (packed) pack_fast(q.codes, bits, packed);
  return q;
}

at::Tensor affine_dequantize(const AffineQuant& q, const at::Tensor& bits, const AffineLayout& layout,
                             int64_t rotation_block) {
  if (rotation_block > 0) check_rotation_layout(layout, rotation_block);
  const int64_t rows = layout.rows, cols = layout.cols;
  at::Tensor out = at::empty({rows, cols}, at::kFloat);
  float* o = out.data_ptr<float>();
  const uint8_t* codes = q.codes.data_ptr<uint8_t>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  std::vector<float> lo, hi;
  decoded_ranges(q, lo, hi);
  const std::vector<float> levels = levels_of(b, cols);
  const float uniform = uniform_level(levels);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for_row_groups(layout, r, [&](int64_t row, int64_t c0, int64_t c1, int64_t g) {
        if (g >= 0) {
          float* d = o + row * cols + c0;
          if (uniform > 0)
            dequantize_run_uniform(codes + row * cols + c0, uniform, c1 - c0, lo[g], hi[g], d);
          else
            dequantize_run(codes + row * cols + c0, levels.data() + c0, c1 - c0, lo[g], hi[g], d);
          if (rotation_block > 0) hadamard_blocks(d, d, 1, rotation_block);  // rotated back while in cache
          return;
        }
        for (int64_t c = c0; c < c1; ++c)  // a range per channel
          o[row * cols + c] = dequantize_one(codes[row * cols + c], lo[c], step_of(lo[c], hi[c], b[c]));
      });
    }
  });
  return out;
}

namespace {

// out[i] += a[i] * b[i] over [0, n).
AMAQ_MULTIVERSION void multiply_add_run(const float* a, const float* b, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] += a[i] * b[i];
}

// out[i] += a[i] over [0, n).
AMAQ_MULTIVERSION void add_run(const float* a, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] += a[i];
}

}  // namespace

at::Tensor column_dots(const at::Tensor& a_in, const at::Tensor& b_in) {
  TORCH_CHECK(a_in.dim() == 2 && a_in.sizes() == b_in.sizes() && a_in.scalar_type() == at::kFloat &&
                  b_in.scalar_type() == at::kFloat && a_in.is_cpu() && b_in.is_cpu(),
              "column_dots takes two (rows, cols) fp32 CPU tensors of one shape");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t rows = a.size(0), cols = a.size(1);
  at::Tensor out = at::zeros({cols}, at::kFloat);
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Blocks of kRows whole rows, each summed by one thread in row order while it streams through
  // them; the blocks' sums then added in block order. The blocks do not depend on the thread count.
  // (Column runs summed over all rows had each thread jump a row's length after every run: it read
  // at half the speed of a copy.)
  constexpr int64_t kRows = 64;
  const int64_t blocks = (rows + kRows - 1) / kRows;
  at::Tensor partial = at::zeros({blocks, cols}, at::kFloat);
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t r = k * kRows; r < std::min(rows, (k + 1) * kRows); ++r)
        multiply_add_run(ap + r * cols, bp + r * cols, cols, pp + k * cols);
  });
  for (int64_t k = 0; k < blocks; ++k) add_run(pp + k * cols, cols, op);
  return out;
}

std::pair<at::Tensor, at::Tensor> affine_lo_step(const AffineQuant& q, const at::Tensor& bits,
                                                 const AffineLayout& layout) {
  const int64_t rows = layout.rows, cols = layout.cols;
  at::Tensor lo_t = at::empty({rows, cols}, at::kFloat), step_t = at::empty({rows, cols}, at::kFloat);
  float* lp = lo_t.data_ptr<float>();
  float* sp = step_t.data_ptr<float>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  std::vector<float> lo, hi;
  decoded_ranges(q, lo, hi);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t g = layout.group_of(r, c);
        lp[r * cols + c] = lo[g];
        sp[r * cols + c] = step_of(lo[g], hi[g], b[c]);
      }
    }
  });
  return {lo_t, step_t};
}

}  // namespace amaq::quant

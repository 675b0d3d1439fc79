#include "quant/affine.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/error.h"
#include "quant/multiversion.h"
#include "quant/rotation.h"

// The hot loops (AMAQ_MULTIVERSION) keep the reference's arithmetic operation for operation: IEEE
// division, no reciprocal, no fused multiply-add, so every version writes the same bytes. Every
// value is computed, then selected (-fno-trapping-math lets the compiler do that for a select of
// trapping operations; the values are the same IEEE results).
namespace amaq::quant {

namespace {

// A range group's stored fp16 bounds (relative to the tensor's scale) and what they decode to.
struct HalfRange {
  uint16_t lo16, hi16;
  float lo, hi;
};

HalfRange half_range_generic(float mn, float mx, float scale) {
  HalfRange r;
  r.lo16 = half_bits_rounded(mn / scale, false);
  r.hi16 = half_bits_rounded(mx / scale, true);
  r.lo = half_bits_to_float(r.lo16) * scale;
  r.hi = half_bits_to_float(r.hi16) * scale;
  return r;
}

// The same by the F16C instructions (every x86-64-v3 CPU has them): the same round-to-nearest-even
// as c10::Half's bit arithmetic and __float2half_rn on CUDA (tested against c10::Half), without
// its cost per group.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("f16c"))) HalfRange half_range_f16c(float mn, float mx, float scale) {
  const float a = mn / scale, b = mx / scale;
  const auto ha = static_cast<uint16_t>(_cvtss_sh(a, _MM_FROUND_TO_NEAREST_INT));
  const auto hb = static_cast<uint16_t>(_cvtss_sh(b, _MM_FROUND_TO_NEAREST_INT));
  HalfRange r;
  r.lo16 = nudge_half(ha, _cvtsh_ss(ha), a, false);
  r.hi16 = nudge_half(hb, _cvtsh_ss(hb), b, true);
  r.lo = _cvtsh_ss(r.lo16) * scale;
  r.hi = _cvtsh_ss(r.hi16) * scale;
  return r;
}
HalfRange half_range(float mn, float mx, float scale) {  // 8 lanes or more: an x86-64-v3 CPU, with F16C
  return lane_width() >= 8 ? half_range_f16c(mn, mx, scale) : half_range_generic(mn, mx, scale);
}
#else
HalfRange half_range(float mn, float mx, float scale) {
  return half_range_generic(mn, mx, scale);
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

namespace {

void check_input(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "expected contiguous fp32 (rows, cols)");
  TORCH_CHECK(x.size(0) == layout.rows && x.size(1) == layout.cols, "layout does not match x");
  TORCH_CHECK(bits.numel() == layout.cols && bits.scalar_type() == at::kByte, "bits must be (cols,) uint8");
  TORCH_CHECK(layout.granularity != Granularity::kGroup || layout.group > 0, "group size must be positive");
}

float tensor_scale(float max_abs) {
  return max_abs > 0 ? max_abs : 1.0f;
}

}  // namespace

void throw_non_finite(int64_t bad, int64_t n, int64_t first) {
  throw Error("tensor to encode has " + std::to_string(bad) + " NaN/Inf values of " + std::to_string(n) +
                  " (first at flat index " + std::to_string(first) + ")",
              "training diverged: lower the learning rate, enable gradient clipping, or check the input data");
}

namespace {

// L lanes as GCC vector types (multiversion.h): each version runs as many as its registers hold. A
// lane computes exactly what the scalar code computes on its share of the elements.

// max |p[i]| over [0, n) (NaN and Inf ignored) and how many are NaN or Inf.
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

// min and max of p[0, n) (finite values), exactly as the sequential `v < mn ? v : mn` and
// `v > mx ? v : mx` from +-inf find them: lane by lane, then, where the result is a zero (whose
// sign depends on which zero came first), again in order.
template <int L>
AMAQ_LANES_INLINE void range_run_lanes(const float* p, int64_t n, float* lo, float* hi) {
  using F = typename Lanes<L>::F;
  constexpr float inf = std::numeric_limits<float>::infinity();
  F mn = F{} + inf, mx = F{} - inf;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    F v;
    std::memcpy(&v, p + i, sizeof v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  float a = inf, b = -inf;
  for (int j = 0; j < L; ++j) {
    a = mn[j] < a ? mn[j] : a;
    b = mx[j] > b ? mx[j] : b;
  }
  for (; i < n; ++i) {
    a = p[i] < a ? p[i] : a;
    b = p[i] > b ? p[i] : b;
  }
  if (a == 0.0f || b == 0.0f) {
    a = inf, b = -inf;
    for (i = 0; i < n; ++i) {
      a = p[i] < a ? p[i] : a;
      b = p[i] > b ? p[i] : b;
    }
  }
  *lo = a, *hi = b;
}
AMAQ_LANE_VERSIONS(void, range_run, (const float* p, int64_t n, float* lo, float* hi), (p, n, lo, hi))

// dequantize_one of codes[0, n) in range [lo, hi].
AMAQ_MULTIVERSION void dequantize_run(const uint8_t* codes, const float* levels, int64_t n, float lo, float hi,
                                      float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float step = (hi - lo) / levels[i];
    out[i] = lo + static_cast<float>(codes[i]) * step;
  }
}

// The same where every channel has the same width: one step, no division per element.
AMAQ_MULTIVERSION void dequantize_run_uniform(const uint8_t* codes, float level, int64_t n, float lo, float hi,
                                              float* out) {
  const float step = (hi - lo) / level;
  for (int64_t i = 0; i < n; ++i) out[i] = lo + static_cast<float>(codes[i]) * step;
}

// quantize_one's nearest rounding of x into [lo, lo + level * step] (inlined into the loops below).
inline uint8_t nearest_code(float x, float lo, float step, float level) {
  const float u = (x - lo) / step;
  const float below = u < 0.0f ? 0.0f : u;
  const float v = level < below ? level : below;
  const float rounded = (v + 12582912.0f) - 12582912.0f;  // round_half_even
  return static_cast<uint8_t>(static_cast<int32_t>(step > 0 ? rounded : 0.0f));
}

// Nearest-rounding codes of p[0, n), channel i with levels[i] = 2^bits - 1, all in range [lo, hi]:
// quantize_one's arithmetic; and, when `decoded` is given, dequantize_one's of each code.
AMAQ_MULTIVERSION void quantize_run(const float* p, const float* levels, int64_t n, float lo, float hi, uint8_t* codes,
                                    float* decoded) {
  for (int64_t i = 0; i < n; ++i) codes[i] = nearest_code(p[i], lo, (hi - lo) / levels[i], levels[i]);
  if (decoded) dequantize_run(codes, levels, n, lo, hi, decoded);
}

// The same where every channel has `level` levels: the step computed once (the same IEEE quotient),
// which halves the divisions, the loop's bound.
AMAQ_MULTIVERSION void quantize_run_uniform(const float* p, float level, int64_t n, float lo, float hi, uint8_t* codes,
                                            float* decoded) {
  const float step = (hi - lo) / level;
  for (int64_t i = 0; i < n; ++i) codes[i] = nearest_code(p[i], lo, step, level);
  if (decoded) dequantize_run_uniform(codes, level, n, lo, hi, decoded);
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
  q.scale = tensor_scale(max_abs);
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

// max |H x| over x's rotated groups of `block` channels: the scale that block_hadamard then
// checked_max_abs give, without the rotated copy. Where a rotated value is NaN or Inf, x's own are
// named (checked_max_abs), or, all finite, the rotation overflowed.
float rotated_max_abs(const at::Tensor& x, int64_t block) {
  const float* xp = x.data_ptr<float>();
  const int64_t rows = x.size(0), cols = x.size(1);
  std::vector<float> row_max(static_cast<size_t>(rows), 0.0f);
  std::vector<int64_t> row_bad(static_cast<size_t>(rows), 0);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(static_cast<size_t>(block));
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c0 = 0; c0 < cols; c0 += block) {
        int64_t bad = 0;
        hadamard_block(xp + r * cols + c0, buf.data(), block);
        row_max[r] = std::max(row_max[r], max_abs_run(buf.data(), block, &bad));
        row_bad[r] += bad;
      }
    }
  });
  float m = 0.0f;
  int64_t bad = 0;
  for (int64_t r = 0; r < rows; ++r) {
    m = std::max(m, row_max[r]);
    bad += row_bad[r];
  }
  if (bad > 0) {
    checked_max_abs(x);
    throw Error("rotating the tensor's channel groups overflowed fp32 (values near 3.4e38)",
                "scale the activations down, or drop rot=hadamard");
  }
  return m;
}

}  // namespace

AffineQuant affine_quantize(const at::Tensor& x, const at::Tensor& bits, const AffineLayout& layout, Rounding rounding,
                            uint64_t seed, at::Tensor* decoded, int64_t rotation_block) {
  check_input(x, bits, layout);
  const int64_t rows = layout.rows, cols = layout.cols, G = layout.num_groups();
  const float* xp = x.data_ptr<float>();
  const uint8_t* b = bits.data_ptr<uint8_t>();
  AffineQuant q;
  if (rotation_block > 0) {
    check_rotation_layout(layout, rotation_block);
    TORCH_CHECK(rounding == Rounding::kNearest, "a rotated encoding rounds to nearest");
    q.scale = tensor_scale(rotated_max_abs(x, rotation_block));  // NaN/Inf named where they are in x
  } else {
    q.scale = tensor_scale(checked_max_abs(x));
  }
  const float scale = q.scale;
  q.lo = at::empty({G}, at::kHalf);
  q.hi = at::empty({G}, at::kHalf);
  auto* lo16 = reinterpret_cast<uint16_t*>(q.lo.data_ptr());
  auto* hi16 = reinterpret_cast<uint16_t*>(q.hi.data_ptr());
  q.codes = at::empty({rows, cols}, at::kByte);
  uint8_t* out = q.codes.data_ptr<uint8_t>();

  if (rotation_block > 0 || (rounding == Rounding::kNearest && layout.granularity != Granularity::kChannel)) {
    // One pass: each group's range, codes and decoded values while it is in cache.
    const std::vector<float> levels = levels_of(b, cols);
    const float uniform = uniform_level(levels);
    float* dp = nullptr;
    if (decoded) {
      *decoded = at::empty({rows, cols}, at::kFloat);
      dp = decoded->data_ptr<float>();
    }
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> rotated(static_cast<size_t>(rotation_block));
      for (int64_t r = r0; r < r1; ++r) {
        for_row_groups(layout, r, [&](int64_t row, int64_t c0, int64_t c1, int64_t g) {
          const float* p = xp + row * cols + c0;
          if (rotation_block > 0) {  // the group rotated, in cache
            hadamard_block(p, rotated.data(), rotation_block);
            p = rotated.data();
          }
          float mn, mx;
          range_run(p, c1 - c0, &mn, &mx);
          const HalfRange h = half_range(mn, mx, scale);
          lo16[g] = h.lo16;
          hi16[g] = h.hi16;
          const float lo = h.lo, hi = h.hi;
          float* d = dp ? dp + row * cols + c0 : nullptr;
          if (uniform > 0)
            quantize_run_uniform(p, uniform, c1 - c0, lo, hi, out + row * cols + c0, d);
          else
            quantize_run(p, levels.data() + c0, c1 - c0, lo, hi, out + row * cols + c0, d);
          if (d && rotation_block > 0) hadamard_block(d, d, rotation_block);  // rotated back
        });
      }
    });
    return q;
  }

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
          if (rotation_block > 0) hadamard_block(d, d, rotation_block);  // rotated back while in cache
          return;
        }
        for (int64_t c = c0; c < c1; ++c)  // a range per channel
          o[row * cols + c] = dequantize_one(codes[row * cols + c], lo[c], step_of(lo[c], hi[c], b[c]));
      });
    }
  });
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

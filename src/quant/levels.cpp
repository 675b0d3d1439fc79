#include "quant/levels.h"

#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "quant/bitpack.h"
#include "quant/multiversion.h"

// Like affine.cpp, the loops marked AMAQ_MULTIVERSION compute lane by lane what the scalar code
// computes (no fused multiply-add, no reassociation), so every version and the reference write the
// same bytes.
namespace amaq::quant {
namespace {

constexpr int kMaxBits = 8;

double normal_cdf(double x) {
  return 0.5 * std::erfc(-x / std::sqrt(2.0));
}
// The p-quantile of N(0, 1), 0 < p < 1, by bisection: slow, exact to double precision, the same everywhere.
double normal_quantile(double p) {
  double lo = -40, hi = 40;
  for (int i = 0; i < 200 && hi - lo > 0; ++i) {
    const double mid = 0.5 * (lo + hi);
    (normal_cdf(mid) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

// Midpoints between neighbouring levels: an element's code is the number of them below it.
std::vector<float> thresholds_of(const std::vector<float>& levels) {
  std::vector<float> t(levels.size() - 1);
  for (size_t i = 0; i + 1 < levels.size(); ++i) t[i] = (levels[i] + levels[i + 1]) * 0.5f;
  return t;
}

// The 4 L bytes of L int32 lanes. (GCC takes no vector_size that depends on a template parameter as
// a shuffle's mask, so each width is spelled out.)
typedef uint8_t Bytes16 __attribute__((vector_size(16)));
typedef uint8_t Bytes32 __attribute__((vector_size(32)));
typedef uint8_t Bytes64 __attribute__((vector_size(64)));
template <int L>
using LaneBytes = std::conditional_t<L == 4, Bytes16, std::conditional_t<L == 8, Bytes32, Bytes64>>;

// The low byte of each of L int32 lanes, in order, into dst[0, L): one byte shuffle (pshufb and a
// permute on AVX2).
template <int L, typename = std::make_index_sequence<4 * L>>
struct LowBytes;
template <int L, size_t... k>
struct LowBytes<L, std::index_sequence<k...>> {
  using B = LaneBytes<L>;
  static AMAQ_LANES_INLINE void store(typename Lanes<L>::I c, uint8_t* dst) {
    constexpr B mask{static_cast<uint8_t>(4 * (k % L))...};
    B bytes;
    std::memcpy(&bytes, &c, sizeof bytes);
    bytes = __builtin_shuffle(bytes, mask);
    std::memcpy(dst, &bytes, L);
  }
};

// code_run's vector loop for K levels known at compile time (the thresholds and levels broadcast
// once); returns how many elements it did (a multiple of L).
template <int L, int K, bool kDecode>
AMAQ_LANES_INLINE int64_t code_vectors(const float* p, int64_t n, float inv, const float* t, const float* levels,
                                       float step, uint8_t* codes, float* out) {
  using F = typename Lanes<L>::F;
  using I = typename Lanes<L>::I;
  F tv[K - 1], lv[K];
  for (int j = 0; j < K; ++j) {
    if (j + 1 < K) tv[j] = F{} + t[j];
    lv[j] = F{} + levels[j];
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    F v;
    std::memcpy(&v, p + i, sizeof v);
    const F u = v * inv;
    I c = {};
    F level = lv[0];
#pragma GCC unroll 16
    for (int j = 0; j + 1 < K; ++j) {  // thresholds ascend: the last one below u picks the level
      const I above = u > tv[j];       // a true comparison is -1
      c -= above;
      if constexpr (kDecode) level = above ? lv[j + 1] : level;
    }
    LowBytes<L>::store(c, codes + i);
    if constexpr (kDecode) {
      const F d = level * step;
      std::memcpy(out + i, &d, sizeof d);
    }
  }
  return i;
}

// code_vectors for K = k0, 2 k0, ... up to 16 levels (0 elements done for more: they are searched
// one by one). (A template, not a lambda: a lambda's body would not be compiled for the lane
// version's target.)
template <int L, int k0>
AMAQ_LANES_INLINE int64_t code_vectors_for(int K, const float* p, int64_t n, float inv, const float* t,
                                           const float* levels, float step, uint8_t* codes, float* out) {
  if constexpr (k0 > 16) {
    return 0;
  } else {
    if (K != k0) return code_vectors_for<L, 2 * k0>(K, p, n, inv, t, levels, step, codes, out);
    return out ? code_vectors<L, k0, true>(p, n, inv, t, levels, step, codes, out)
               : code_vectors<L, k0, false>(p, n, inv, t, levels, step, codes, out);
  }
}

// The codes of p[0, n) * inv against the K - 1 ascending thresholds t: how many lie below each value;
// with `out`, also each code's level times `step` there (what decode_run gives, bit for bit).
template <int L>
AMAQ_LANES_INLINE void code_run_lanes(const float* p, int64_t n, float inv, const float* t, const float* levels, int K,
                                      float step, uint8_t* codes, float* out) {
  int64_t i = code_vectors_for<L, 2>(K, p, n, inv, t, levels, step, codes, out);
  for (; i < n; ++i) {  // a branch-free binary search over the K - 1 thresholds
    const float u = p[i] * inv;
    int c = 0;
    for (int s = K / 2; s >= 1; s /= 2) c += (u > t[c + s - 1]) ? s : 0;
    codes[i] = static_cast<uint8_t>(c);
    if (out) out[i] = levels[c] * step;
  }
}
AMAQ_LANE_VERSIONS(void, code_run,
                   (const float* p, int64_t n, float inv, const float* t, const float* levels, int K, float step,
                    uint8_t* codes, float* out),
                   (p, n, inv, t, levels, K, step, codes, out))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// decode_run's values for at most 16 levels, 8 at a time, on an x86-64-v3 CPU: the K products
// `t` are computed once and each lane picks its code's with two permutes and a blend on the code's
// bit 3, not a gather per value. Returns how many it did (a multiple of 8).
__attribute__((target("arch=x86-64-v3"))) int64_t decode_small_avx2(const uint8_t* codes, int64_t n, const float* t,
                                                                    float* out) {
  const __m256 low = _mm256_loadu_ps(t), high = _mm256_loadu_ps(t + 8);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(code, 28));  // bit 3 as the sign
    _mm256_storeu_ps(
        out + i, _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, code), _mm256_permutevar8x32_ps(high, code), upper));
  }
  return i;
}
#endif

// Each code's level times `step`; with at most 16 levels on an x86-64-v3 CPU or better, through
// decode_small_avx2 (the same products).
AMAQ_MULTIVERSION void decode_run(const uint8_t* codes, int64_t n, const float* levels, int K, float step, float* out) {
  int64_t i = 0;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (K <= 16 && lane_width() >= 8) {
    float t[16] = {};
    for (int k = 0; k < K; ++k) t[k] = levels[k] * step;
    i = decode_small_avx2(codes, n, t, out);
  }
#endif
  for (; i < n; ++i) out[i] = levels[codes[i]] * step;
}

// The reference's code search: walk up the thresholds.
uint8_t code_ref(float u, const std::vector<float>& t) {
  size_t c = 0;
  while (c < t.size() && u > t[c]) ++c;
  return static_cast<uint8_t>(c);
}

// The range groups of a token layout are its rows; of a group layout, runs of `group` along a row.
int64_t group_width(const AffineLayout& L) {
  return L.granularity == Granularity::kToken ? std::max<int64_t>(L.cols, 1) : L.group;
}

void check_layout(const AffineLayout& L) {
  TORCH_CHECK(L.granularity != Granularity::kChannel, "non-uniform levels take token or group ranges");
  TORCH_CHECK(group_width(L) > 0, "group size must be positive");
}

// f(g, start, length) for every range group of rows [r0, r1), in order: group g lies at
// [start, start + length) of the flat tensor.
template <typename F>
void for_groups_of_rows(const AffineLayout& L, int64_t r0, int64_t r1, const F& f) {
  const int64_t per = L.groups_per_row(), width = group_width(L);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k = 0, c0 = 0; k < per; ++k, c0 += width)
      f(r * per + k, r * L.cols + c0, std::min(width, L.cols - c0));
}

// for_groups_of_rows over every row; `parallel`: threads over rows.
template <typename F>
void for_each_group(const AffineLayout& L, bool parallel, const F& f) {
  if (!parallel) return for_groups_of_rows(L, 0, L.rows, f);
  at::parallel_for(0, L.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(L.cols, 1)),
                   [&](int64_t r0, int64_t r1) { for_groups_of_rows(L, r0, r1, f); });
}

// Lloyd's algorithm on a fixed sample of the normalised elements u (in [-1, 1]), weighted by their
// groups' squared steps, from `levels`: the codebook that (locally) minimises the sample's squared
// error in x. The sample: kSampleRuns runs of kRunLength consecutive elements spread evenly over
// the tensor (a few thousand cache lines, not one miss per element), or every element of a smaller
// tensor. It goes into kBins bins of width 2 / kBins, each keeping the sum of w and of
// w u of its elements: a round then costs kBins steps (a bin joins the cell of its mean, a level
// becomes its cell's mean), not a pass over the sample. At most 40 rounds: from NormalFloat, on
// Gaussian data the error is within 1% of the fixed point.
constexpr int kBins = 4096;
constexpr int64_t kRunLength = 64, kSampleRuns = 1024;

std::vector<float> fit_levels(const float* x, int64_t n, const AffineLayout& L, const std::vector<float>& step,
                              const std::vector<float>& inv, std::vector<float> levels) {
  std::vector<double> bin_w(kBins, 0.0), bin_wu(kBins, 0.0);
  const auto add_run = [&](int64_t i0, int64_t len) {  // elements [i0, i0 + len)
    int64_t r = i0 / L.cols, c = i0 % L.cols;
    for (int64_t i = i0; i < i0 + len; ++i, ++c) {
      if (c == L.cols) c = 0, ++r;
      const int64_t g = L.group_of(r, c);
      const float u = x[i] * inv[g];
      const double w = static_cast<double>(step[g]) * static_cast<double>(step[g]);
      const int b = std::clamp(static_cast<int>((u + 1.0f) * (kBins / 2.0f)), 0, kBins - 1);
      bin_w[b] += w;
      bin_wu[b] += w * static_cast<double>(u);
    }
  };
  if (n <= kRunLength * kSampleRuns) {
    add_run(0, n);
  } else {
    for (int64_t k = 0; k < kSampleRuns; ++k) add_run(k * (n / kSampleRuns), kRunLength);
  }
  // The bins that hold any of the sample, with their means (the same in every round).
  struct Bin {
    float mean;
    double w, wu;
  };
  std::vector<Bin> bins;
  for (int b = 0; b < kBins; ++b)
    if (bin_w[b] > 0) bins.push_back({static_cast<float>(bin_wu[b] / bin_w[b]), bin_w[b], bin_wu[b]});
  const int K = static_cast<int>(levels.size());
  std::vector<double> sum(K), weight(K);
  for (int it = 0; it < 40; ++it) {
    const std::vector<float> t = thresholds_of(levels);
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(weight.begin(), weight.end(), 0.0);
    int c = 0;
    for (const Bin& bin : bins) {
      while (c < K - 1 && bin.mean > t[c]) ++c;  // bins ascend: so do their cells
      sum[c] += bin.wu;
      weight[c] += bin.w;
    }
    bool moved = false;
    for (int c = 0; c < K; ++c) {
      if (!(weight[c] > 0)) continue;  // an empty cell keeps its level (it lies between its neighbours)
      const auto l = static_cast<float>(sum[c] / weight[c]);
      moved |= l != levels[c];
      levels[c] = l;
    }
    if (!moved) break;
  }
  return levels;
}

}  // namespace

std::vector<float> normal_float_levels(int bits) {
  TORCH_CHECK(bits >= 2 && bits <= kMaxBits, "NormalFloat levels take 2 to 8 bits, got ", bits);
  const int K = 1 << bits, P = K / 2, N = K / 2 - 1;  // P above zero, N below, and zero
  const double offset = 1.0 - 0.5 * (1.0 / (2.0 * K) + 1.0 / (2.0 * (K - 1)));
  std::vector<double> v{0.0};
  for (int i = 0; i < P; ++i) v.push_back(normal_quantile(offset + (0.5 - offset) * i / P));
  for (int i = 0; i < N; ++i) v.push_back(-normal_quantile(offset + (0.5 - offset) * i / N));
  std::sort(v.begin(), v.end());
  std::vector<float> levels;
  for (double d : v) levels.push_back(static_cast<float>(d / v.back()));
  return levels;
}

LevelQuant level_quantize(const at::Tensor& x, const AffineLayout& layout, LevelKind kind, int bits, bool fast,
                          at::Tensor* decoded, uint8_t* packed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "expected contiguous fp32 (rows, cols)");
  TORCH_CHECK(kind != LevelKind::kUniform, "uniform levels are the affine quantizer's (affine.h)");
  TORCH_CHECK(bits >= 1 && bits <= kMaxBits && (bits >= 2 || kind == LevelKind::kLloyd), "no ", bits, "-bit levels");
  check_layout(layout);
  TORCH_CHECK(fast || !packed, "packed codes come from the fast quantizer only");
  const int64_t G = layout.num_groups(), n = x.numel();
  const float* xp = x.data_ptr<float>();
  LevelQuant q;
  // NormalFloat, where lloyd starts too (1 bit: the two halves' midpoints).
  q.levels = bits >= 2 ? normal_float_levels(bits) : std::vector<float>{-0.5f, 0.5f};

  // Each group's step: its max |x|, as fp16 relative to the largest (step[g] holds the max until
  // it is rounded in place).
  std::vector<float> step(G), inv(G);
  std::atomic<int64_t> non_finite{0};
  for_each_group(layout, fast, [&](int64_t g, int64_t s, int64_t len) {
    int64_t bad = 0;
    step[g] = max_abs_run(xp + s, len, &bad);
    if (bad) non_finite += bad;
  });
  if (non_finite > 0) checked_max_abs(x);  // throws, naming the count and the first
  float largest = 0.0f;
  for (float s : step) largest = s > largest ? s : largest;
  q.scale = largest > 0 ? largest : 1.0f;
  q.step.resize(G);
  if (fast) {
    half_bounds(step.data(), G, q.scale, /*up=*/true, q.step.data());  // F16C, eight at a time
  } else {
    for (int64_t g = 0; g < G; ++g) {
      q.step[g] = half_bits_rounded(step[g] / q.scale, /*up=*/true);
      step[g] = half_bits_to_float(q.step[g]) * q.scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) inv[g] = step[g] > 0 ? 1.0f / step[g] : 0.0f;
  if (kind == LevelKind::kLloyd && n > 0) q.levels = fit_levels(xp, n, layout, step, inv, q.levels);

  const std::vector<float> t = thresholds_of(q.levels);
  const int K = static_cast<int>(q.levels.size());
  float* dp = nullptr;
  if (decoded) {
    *decoded = at::empty({layout.rows, layout.cols}, at::kFloat);
    dp = decoded->data_ptr<float>();
  }
  if (!fast) {
    q.codes = at::empty({layout.rows, layout.cols}, at::kByte);
    uint8_t* cp = q.codes.data_ptr<uint8_t>();
    for_each_group(layout, false, [&](int64_t g, int64_t s, int64_t len) {
      for (int64_t i = s; i < s + len; ++i) {
        cp[i] = code_ref(xp[i] * inv[g], t);
        if (dp) dp[i] = q.levels[cp[i]] * step[g];
      }
    });
    return q;
  }
  if (!packed) q.codes = at::empty({layout.rows, layout.cols}, at::kByte);
  produce_codes(at::full({layout.cols}, bits, at::kByte), layout.rows, packed,
                packed ? nullptr : q.codes.data_ptr<uint8_t>(), [&](int64_t r0, int64_t r1, uint8_t* codes) {
                  for_groups_of_rows(layout, r0, r1, [&](int64_t g, int64_t s, int64_t len) {
                    code_run(xp + s, len, inv[g], t.data(), q.levels.data(), K, step[g], codes + (s - r0 * layout.cols),
                             dp ? dp + s : nullptr);
                  });
                });
  return q;
}

at::Tensor level_dequantize(const LevelQuant& q, const AffineLayout& layout) {
  check_layout(layout);
  TORCH_CHECK(static_cast<int64_t>(q.step.size()) == layout.num_groups(), "one step per range group");
  at::Tensor out = at::empty({layout.rows, layout.cols}, at::kFloat);
  const uint8_t* cp = q.codes.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  for_each_group(layout, true, [&](int64_t g, int64_t s, int64_t len) {
    decode_run(cp + s, len, q.levels.data(), static_cast<int>(q.levels.size()), half_bits_to_float(q.step[g]) * q.scale,
               op + s);
  });
  return out;
}

}  // namespace amaq::quant

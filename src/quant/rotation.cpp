#include "quant/rotation.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "quant/multiversion.h"

namespace amaq::quant {

bool is_power_of_two(int64_t n) {
  return n > 0 && (n & (n - 1)) == 0;
}

namespace {

void check_block(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(is_power_of_two(block), "a Hadamard block must be a power of two, got ", block);
  TORCH_CHECK(x.size(-1) % block == 0, "the Hadamard block ", block, " does not divide the ", x.size(-1), " channels");
}

float norm_of(int64_t block) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
}

// The transform of `blocks` runs of `block` floats from src into dst (which may be src), each in cache.
void hadamard_in_parallel(const float* src, float* dst, int64_t blocks, int64_t block) {
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    hadamard_blocks(src + b0 * block, dst + b0 * block, b1 - b0, block);
  });
}

// One butterfly pass h < L inside L lanes: lanes l and l ^ h, (a, c) -> (a + c, a - c), where a is
// the lane without bit h; the same two IEEE operations the scalar pass does for each pair.
template <int L, int H, typename = std::make_index_sequence<L>>
struct InLanes;
template <int L, int H, size_t... l>
struct InLanes<L, H, std::index_sequence<l...>> {
  using I = typename Lanes<L>::I;
  static constexpr I partner{static_cast<int32_t>(l ^ H)...};
  static constexpr I upper{static_cast<int32_t>(l & H)...};
};

template <int L, int H>
AMAQ_LANES_INLINE void butterfly_in_lanes(typename Lanes<L>::F& x) {
  if constexpr (H < L) {
    using M = InLanes<L, H>;
    const typename Lanes<L>::F partner = __builtin_shuffle(x, M::partner);
    x = M::upper ? partner - x : x + partner;
  }
}

// Passes h = V .. V * W / 2 (in vectors) across the W vectors in x: vectors i and i + h, (a, c) ->
// (a + c, a - c) for the vector without bit h.
template <typename F, int W, int H = 1>
AMAQ_LANES_INLINE void butterflies_across(F* x) {
  if constexpr (H < W) {
#pragma GCC unroll 16
    for (int i = 0; i < W; i += 2 * H) {
#pragma GCC unroll 16
      for (int j = i; j < i + H; ++j) {
        const F a = x[j], c = x[j + H];
        x[j] = a + c;
        x[j + H] = a - c;
      }
    }
    butterflies_across<F, W, 2 * H>(x);
  }
}

// The passes h < W * L over a chunk of W vectors of L floats, from s into v, in registers: inside
// the lanes first, then across the vectors. `norm` != 0: these were the block's last passes, so the
// chunk is scaled by it on the way out.
template <int L, int W>
AMAQ_LANES_INLINE void chunk_in_registers(const float* s, float* v, float norm) {
  using F = typename Lanes<L>::F;
  F x[W];
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) {
    std::memcpy(&x[i], s + i * L, sizeof(F));
    butterfly_in_lanes<L, 1>(x[i]);
    butterfly_in_lanes<L, 2>(x[i]);
    butterfly_in_lanes<L, 4>(x[i]);
    butterfly_in_lanes<L, 8>(x[i]);
  }
  butterflies_across<F, W>(x);
  if (norm != 0) {
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) x[i] *= norm;
  }
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) std::memcpy(v + i * L, &x[i], sizeof(F));
}

// chunk_in_registers over the block, in chunks of `vectors` (W, 2 W, ... up to kMax) vectors.
template <int L, int W, int kMax>
AMAQ_LANES_INLINE void chunks_in_registers(int64_t vectors, const float* s, float* v, int64_t block, float norm) {
  if constexpr (W < kMax) {
    if (vectors != W) return chunks_in_registers<L, 2 * W, kMax>(vectors, s, v, block, norm);
  }
  for (int64_t k = 0; k < block; k += W * L) chunk_in_registers<L, W>(s + k, v + k, norm);
}

// The passes h = h0, 2 h0, ... < block, the first from s into v (which may be s), the others in
// place; the last scales by `norm` as it goes (one rounding of the pass's result, as a separate
// multiplication would do).
AMAQ_LANES_INLINE void passes_in_memory(const float* s, float* v, int64_t block, int64_t h0, float norm) {
  for (int64_t h = h0; h < block; h *= 2, s = v) {
    const float scale = 2 * h == block ? norm : 1.0f;  // x 1 is exact
    for (int64_t i = 0; i < block; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = s[j], c = s[j + h];
        v[j] = (a + c) * scale;
        v[j + h] = (a - c) * scale;
      }
    }
  }
}

// The same additions in the same order as block_hadamard_ops, so the same bits (and with any lane
// count: lane-wise the same). The passes h < 16 vectors run in registers, chunk by chunk (the first
// reads src); the rest in place in dst, the last of them scaling by 1 / sqrt(block).
template <int L>
AMAQ_LANES_INLINE void hadamard_block_lanes(const float* s, float* v, int64_t block) {
  const float norm = norm_of(block);
  if (block < L) {
    if (block == 1) v[0] = s[0] * norm;
    passes_in_memory(s, v, block, 1, norm);
    return;
  }
  constexpr int kMaxVectors = 16;
  const int64_t vectors = std::min<int64_t>(block / L, kMaxVectors);
  const float chunk_norm = vectors * L == block ? norm : 0.0f;
  chunks_in_registers<L, 1, kMaxVectors>(vectors, s, v, block, chunk_norm);
  passes_in_memory(v, v, block, vectors * L, norm);
}

template <int L>
AMAQ_LANES_INLINE void hadamard_blocks_lanes(const float* s, float* v, int64_t count, int64_t block) {
  for (int64_t b = 0; b < count; ++b) hadamard_block_lanes<L>(s + b * block, v + b * block, block);
}

}  // namespace

AMAQ_LANE_VERSIONS(void, hadamard_blocks, (const float* s, float* v, int64_t count, int64_t block),
                   (s, v, count, block))

at::Tensor block_hadamard(const at::Tensor& x, int64_t block) {
  if (!x.device().is_cpu()) return block_hadamard_ops(x, block);
  check_block(x, block);
  const at::Tensor src = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty(src.sizes(), src.options());
  hadamard_in_parallel(src.data_ptr<float>(), y.data_ptr<float>(), y.numel() / block, block);
  return y.view(x.sizes());
}

void block_hadamard_(at::Tensor& y, int64_t block) {
  if (!y.device().is_cpu() || y.scalar_type() != at::kFloat || !y.is_contiguous()) {
    y = block_hadamard(y, block);
    return;
  }
  check_block(y, block);
  hadamard_in_parallel(y.data_ptr<float>(), y.data_ptr<float>(), y.numel() / block, block);
}

at::Tensor block_hadamard_ops(const at::Tensor& x, int64_t block) {
  check_block(x, block);
  const int64_t n = x.numel() / block;
  // Butterflies on (n, block / (2h), 2, h): the pair (a, b) h apart becomes (a + b, a - b).
  at::Tensor y = x.to(at::kFloat).reshape({n, block});
  for (int64_t h = 1; h < block; h *= 2) {
    const at::Tensor v = y.view({n, block / (2 * h), 2, h});
    const at::Tensor a = v.select(2, 0), b = v.select(2, 1);
    y = at::stack({a + b, a - b}, 2).view({n, block});
  }
  return (y * norm_of(block)).view(x.sizes());
}

at::Tensor block_hadamard_ref(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(is_power_of_two(block) && x.size(-1) % block == 0, "bad Hadamard block ", block);
  at::Tensor H = at::ones({1, 1}, at::kDouble);
  while (H.size(0) < block) H = at::cat({at::cat({H, H}, 1), at::cat({H, -H}, 1)}, 0);
  H = H / std::sqrt(static_cast<double>(block));
  const at::Tensor xb = x.to(at::kCPU, at::kDouble).reshape({-1, block});
  return at::matmul(xb, H).to(at::kFloat).view(x.sizes()).to(x.device());
}

}  // namespace amaq::quant

#include "quant/rotation.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

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
void hadamard_blocks(const float* src, float* dst, int64_t blocks, int64_t block) {
  at::parallel_for(0, blocks, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) hadamard_block(src + b * block, dst + b * block, block);
  });
}

typedef float V16 __attribute__((vector_size(64)));
typedef int32_t M16 __attribute__((vector_size(64)));

// One butterfly pass h < 16 inside 16 lanes: lanes l and l ^ h, (a, c) -> (a + c, a - c), where a
// is the lane without bit h; the same two IEEE operations the scalar pass does for each pair. (A
// macro: a function taking or returning a 64-byte vector would have another ABI per target.)
#define AMAQ_PARTNER(H)                                                                                           \
  M16 {                                                                                                           \
    0 ^ H, 1 ^ H, 2 ^ H, 3 ^ H, 4 ^ H, 5 ^ H, 6 ^ H, 7 ^ H, 8 ^ H, 9 ^ H, 10 ^ H, 11 ^ H, 12 ^ H, 13 ^ H, 14 ^ H, \
        15 ^ H                                                                                                    \
  }
#define AMAQ_UPPER(H)                                                                                             \
  M16 {                                                                                                           \
    0 & H, 1 & H, 2 & H, 3 & H, 4 & H, 5 & H, 6 & H, 7 & H, 8 & H, 9 & H, 10 & H, 11 & H, 12 & H, 13 & H, 14 & H, \
        15 & H                                                                                                    \
  }
#define AMAQ_BUTTERFLY_IN_LANES(x, H)                           \
  do {                                                          \
    const V16 partner_ = __builtin_shuffle(x, AMAQ_PARTNER(H)); \
    x = AMAQ_UPPER(H) ? partner_ - x : x + partner_;            \
  } while (0)

}  // namespace

// The first pass reads src, the others work in place: the same additions in the same order as
// block_hadamard_ops, so the same bits (and in every AMAQ_MULTIVERSION version: lane-wise the same).
// From 16 channels on, the passes h < 16 run inside 16-lane vectors (lane shuffles), the others
// between them.
AMAQ_MULTIVERSION void hadamard_block(const float* s, float* v, int64_t block) {
  const float norm = norm_of(block);
  if (block == 1) {
    v[0] = s[0] * norm;
    return;
  }
  int64_t h = 2;
  if (block >= 16) {
    for (int64_t k = 0; k < block; k += 16) {
      V16 x;
      std::memcpy(&x, s + k, sizeof x);
      AMAQ_BUTTERFLY_IN_LANES(x, 1);
      AMAQ_BUTTERFLY_IN_LANES(x, 2);
      AMAQ_BUTTERFLY_IN_LANES(x, 4);
      AMAQ_BUTTERFLY_IN_LANES(x, 8);
      std::memcpy(v + k, &x, sizeof x);
    }
    h = 16;
  } else {
    for (int64_t j = 0; j < block; j += 2) {
      const float a = s[j], c = s[j + 1];
      v[j] = a + c;
      v[j + 1] = a - c;
    }
  }
  for (; h < block; h *= 2) {
    for (int64_t i = 0; i < block; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], c = v[j + h];
        v[j] = a + c;
        v[j + h] = a - c;
      }
    }
  }
  for (int64_t j = 0; j < block; ++j) v[j] *= norm;
}

at::Tensor block_hadamard(const at::Tensor& x, int64_t block) {
  if (!x.device().is_cpu()) return block_hadamard_ops(x, block);
  check_block(x, block);
  const at::Tensor src = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty(src.sizes(), src.options());
  hadamard_blocks(src.data_ptr<float>(), y.data_ptr<float>(), y.numel() / block, block);
  return y.view(x.sizes());
}

void block_hadamard_(at::Tensor& y, int64_t block) {
  if (!y.device().is_cpu() || y.scalar_type() != at::kFloat || !y.is_contiguous()) {
    y = block_hadamard(y, block);
    return;
  }
  check_block(y, block);
  hadamard_blocks(y.data_ptr<float>(), y.data_ptr<float>(), y.numel() / block, block);
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

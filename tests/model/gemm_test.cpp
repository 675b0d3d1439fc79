// frozen_linear (oneDNN on the CPU in fp32 where built with it) against at::linear, the reference:
// values and input gradients within fp32 rounding, and the same bits every time for the same input
// wherever it lives in memory (split runs must equal unsplit ones bit for bit).
#include "model/gemm.h"

#include <gtest/gtest.h>

#include "testing.h"

namespace amaq {
namespace {

// Without oneDNN, frozen_linear is at::linear itself: nothing to compare.
#define SKIP_WITHOUT_ONEDNN()                                                              \
  if (!functional::frozen_linear_uses_onednn(at::zeros({1, 4}), at::zeros({4, 4}))) {      \
    GTEST_SKIP() << "this build has no oneDNN (libdnnl-dev): frozen_linear is at::linear"; \
  }

TEST(FrozenLinear, MatchesAtLinearAndItsInputGradient) {
  SKIP_WITHOUT_ONEDNN();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(81);
  for (bool with_bias : {false, true}) {
    for (auto shape : {std::vector<int64_t>{2, 16, 64}, std::vector<int64_t>{37, 64}, std::vector<int64_t>{1, 1, 64}}) {
      SCOPED_TRACE(::testing::Message() << "bias " << with_bias << " shape " << at::IntArrayRef(shape));
      const at::Tensor w = at::randn({48, 64}, gen), b = with_bias ? at::randn({48}, gen) : at::Tensor();
      const at::Tensor x = at::randn(shape, gen);
      const at::Tensor dy_seed = at::randn({48}, gen);
      at::Tensor xa = x.clone().requires_grad_(true), xb = x.clone().requires_grad_(true);
      at::Tensor ya = functional::frozen_linear(xa, w, b), yb = at::linear(xb, w, b);
      ASSERT_EQ(ya.sizes(), yb.sizes());
      EXPECT_TRUE(testing::all_close(ya, yb, 1e-5, 1e-5));
      (ya * dy_seed).sum().backward();
      (yb * dy_seed).sum().backward();
      EXPECT_TRUE(testing::all_close(xa.grad(), xb.grad(), 1e-5, 1e-5));
    }
  }
}

TEST(FrozenLinear, SameInputSameBitsAtAnyAddress) {
  SKIP_WITHOUT_ONEDNN();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(82);
  const at::Tensor w = at::randn({96, 128}, gen), b = at::randn({96}, gen);
  const at::Tensor x = at::randn({3, 40, 128}, gen);
  const at::Tensor first = functional::frozen_linear(x, w, b);
  for (int64_t offset : {0, 1, 3, 16}) {  // the same values at other alignments
    at::Tensor buf = at::empty({x.numel() + offset});
    at::Tensor moved = buf.narrow(0, offset, x.numel()).view(x.sizes());
    moved.copy_(x);
    EXPECT_TRUE(at::equal(functional::frozen_linear(moved, w, b), first)) << "offset " << offset;
    at::Tensor wbuf = at::empty({w.numel() + offset}), bbuf = at::empty({b.numel() + offset});
    at::Tensor w_moved = wbuf.narrow(0, offset, w.numel()).view(w.sizes()), b_moved = bbuf.narrow(0, offset, b.numel());
    w_moved.copy_(w);
    b_moved.copy_(b);
    EXPECT_TRUE(at::equal(functional::frozen_linear(x, w_moved, b_moved), first)) << "weights at offset " << offset;
  }
}

}  // namespace
}  // namespace amaq

// AQ-SGD: the first pass goes in full, later passes send the quantized change; both sides keep the
// same memory, through spills to disk and back.
#include <gtest/gtest.h>
#include <unistd.h>

#include "core/fs.h"
#include "quant/codec.h"
#include "testing.h"

namespace amaq::quant {
namespace {

EncodeArgs ids(std::vector<int64_t> v) {
  EncodeArgs a;
  a.sample_ids = std::move(v);
  return a;
}

TEST(Aqsgd, SecondPassReconstructsWithinTheErrorOfTheDifference) {
  CodecSpec spec = CodecSpec::parse("aqsgd:bits=3");
  Codec sender(spec), receiver(spec);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  at::Tensor x1 = at::randn({2, 16, 32}, gen);
  Encoded first = sender.encode(x1, ids({7, 9}));
  EXPECT_TRUE(at::equal(first.decoded, x1));  // full precision the first time
  EXPECT_TRUE(at::equal(receiver.decode(first.packet), x1));

  at::Tensor delta = 0.01 * at::randn({2, 16, 32}, gen);
  at::Tensor x2 = x1 + delta;
  Encoded second = sender.encode(x2, ids({7, 9}));
  EXPECT_TRUE(at::equal(receiver.decode(second.packet), second.decoded));
  // Header and dims, 2 ids, 2 kinds, fp16 scales per (sample, channel), 3-bit codes: vs fp32 in full.
  EXPECT_EQ(second.packet.size(), size_t(24 + 12 + 16 + 2 + 2 * 32 * 2 + 2 * 16 * 32 * 3 / 8));
  EXPECT_EQ(first.packet.size(), size_t(24 + 12 + 16 + 2 + 2 * 16 * 32 * 4));
  // Symmetric 3-bit with a per-(sample, channel) max-abs: |error| <= step / 2, step = amax / 3.
  at::Tensor step = delta.abs().amax(1, /*keepdim=*/true) / 3;
  at::Tensor err = (second.decoded - x2).abs();
  EXPECT_TRUE((err <= step * 0.5 * (1 + 1e-3) + 1e-7).all().item<bool>()) << (err / step).max();
  // Far below quantizing x2 itself with the same bits.
  at::Tensor direct_step = x2.abs().amax(1, true) / 3;
  EXPECT_LT(err.max().item<double>(), 0.1 * direct_step.min().item<double>());
}

TEST(Aqsgd, MixedBatchOfNewAndSeenSamples) {
  CodecSpec spec = CodecSpec::parse("aqsgd:bits=4");
  Codec sender(spec), receiver(spec);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(31);
  at::Tensor a = at::randn({2, 8, 16}, gen);
  receiver.decode(sender.encode(a, ids({1, 2})).packet);
  at::Tensor b = at::randn({3, 8, 16}, gen);
  b[0] = a[1] + 0.001;  // sample 2 again
  Encoded e = sender.encode(b, ids({2, 3, 4}));
  at::Tensor got = receiver.decode(e.packet);
  EXPECT_TRUE(at::equal(got, e.decoded));
  EXPECT_TRUE(at::equal(got[1], b[1]));  // new samples arrive exactly
  EXPECT_TRUE(at::allclose(got[0], b[0], 0, 1e-3));
  EXPECT_EQ(sender.aqsgd_buffer()->samples(), 4);
}

TEST(Aqsgd, BufferSpillsToDiskAndReloadsInStep) {
  AqsgdOptions small;
  small.max_memory_bytes = 2 * 8 * 16 * 4;  // two samples of (8, 16) fp32
  CodecSpec spec = CodecSpec::parse("aqsgd:bits=4");
  Codec sender(spec, Impl::kFast, small), receiver(spec, Impl::kRef, small);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  std::vector<at::Tensor> x, sent(6);
  for (int s = 0; s < 6; ++s) x.push_back(at::randn({1, 8, 16}, gen));
  for (int epoch = 0; epoch < 3; ++epoch) {
    for (int s = 0; s < 6; ++s) {
      x[s] = x[s] + 0.01 * at::randn({1, 8, 16}, gen);
      Encoded e = sender.encode(x[s], ids({s}));
      ASSERT_TRUE(at::equal(receiver.decode(e.packet), e.decoded)) << "epoch " << epoch << " sample " << s;
      if (epoch > 0) {  // 4-bit symmetric: within half a step of the change since the last pass
        at::Tensor step = (x[s] - sent[s]).abs().amax(1, true) / 7;
        EXPECT_TRUE(((e.decoded - x[s]).abs() <= step * 0.5 * (1 + 1e-3) + 1e-7).all().item<bool>());
      }
      sent[s] = e.decoded;
    }
  }
  EXPECT_GT(sender.aqsgd_buffer()->spilled_samples(), 0);
  EXPECT_LE(sender.aqsgd_buffer()->memory_bytes(), small.max_memory_bytes);
  EXPECT_EQ(sender.aqsgd_buffer()->samples(), 6);
}

TEST(Aqsgd, DeltaForAnUnknownSampleIsRefused) {
  CodecSpec spec = CodecSpec::parse("aqsgd:bits=4");
  Codec sender(spec), fresh_receiver(spec);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(32);
  at::Tensor x = at::randn({1, 4, 8}, gen);
  sender.encode(x, ids({5}));
  Encoded delta = sender.encode(x * 1.01, ids({5}));
  EXPECT_THROW(fresh_receiver.decode(delta.packet), PacketError);
}

}  // namespace
// The spill file is created exclusively and never through a link: a file or symlink planted at its
// path makes the spill fail by name instead of writing through it.
TEST(Aqsgd, SpillFileIsNeverOpenedThroughALink) {
  testing::TempDir tmp;
  testing::write_bytes(tmp.file("target"), "not yours");
  ASSERT_EQ(::symlink(tmp.file("target").c_str(), tmp.file("planted").c_str()), 0);
  AqsgdBuffer buf(/*max_memory_bytes=*/64, tmp.file("planted"));
  buf.put(1, at::zeros({4, 4}));
  EXPECT_AMAQ_ERROR(buf.put(2, at::zeros({4, 4})), "spill file", "planted");
  EXPECT_EQ(read_file(tmp.file("target")), "not yours");
}

}  // namespace amaq::quant

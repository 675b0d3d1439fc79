// Every lane version of the explicit-vector loops (AMAQ_LANE_VERSIONS: 4 lanes for SSE2, 8 for
// AVX2, 16 for AVX-512, as far as this CPU runs them) writes the reference path's bytes: ranges
// that end at a signed zero, constant ranges, NaN counts, rotations of every block size, and the
// codebook search of non-uniform levels on both sides of its 16-level switch; and fp16 range
// bounds converted as c10::Half converts them.
#include "quant/multiversion.h"

#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "quant/affine.h"
#include "quant/codec.h"
#include "quant/packet.h"
#include "quant/quant_math.h"
#include "quant/rotation.h"
#include "testing.h"

namespace amaq::quant {
namespace {

// Runs f once per lane width this CPU has, forced, and restores the CPU's own.
template <typename F>
void for_each_lane_width(const F& f) {
  struct Restore {
    ~Restore() { force_lane_width(0); }
  } restore;
  const int own = lane_width();
  for (int lanes : {4, 8, 16}) {
    if (lanes > own) break;
    force_lane_width(lanes);
    SCOPED_TRACE("lanes " + std::to_string(lanes));
    f();
  }
}

TEST(LaneVersions, TheCpuRunsAtLeastFourAndNoMoreIsForced) {
  const int own = lane_width();
  EXPECT_TRUE(own == 4 || own == 8 || own == 16) << own;
  if (own < 16) {
    EXPECT_THROW(force_lane_width(16), c10::Error);
  }
  EXPECT_THROW(force_lane_width(5), c10::Error);
  force_lane_width(4);
  EXPECT_EQ(lane_width(), 4);
  force_lane_width(0);
  EXPECT_EQ(lane_width(), own);
}

TEST(LaneVersions, EveryVersionWritesTheReferencesPackets) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  // Heavy tails with outlier channels, an odd channel count (tails of every lane width), rows that
  // end in a short block of the packer's, zeros of both signs, a constant token and a negated one.
  at::Tensor x = testing::with_outlier_channels(testing::student_t3({3, 41, 301}, gen)).contiguous();
  float* p = x.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); i += 7) p[i] = (i / 7) % 3 ? -0.0f : 0.0f;
  x[1][3].fill_(0.25f);
  x[2].neg_();
  const at::Tensor x256 = testing::with_outlier_channels(testing::student_t3({2, 33, 256}, gen));
  for_each_lane_width([&] {
    for (const char* text :
         {"fixed:bits=4,group=64", "fixed:bits=3,gran=token", "fixed:bits=1,group=64", "fixed:bits=8,group=64",
          "fixed:bits=4,levels=lloyd,group=64", "fixed:bits=1,levels=lloyd,group=64", "fixed:bits=2,levels=nf,group=64",
          "fixed:bits=3,levels=nf,gran=token", "fixed:bits=6,levels=lloyd,group=64",
          "fixed:bits=4,group=8,rot=hadamard", "fixed:bits=4,group=128,rot=hadamard",
          "fixed:bits=3,levels=nf,group=128,rot=hadamard", "amaq:budget=4,group=32", "amaq:budget=3,gran=token"}) {
      const std::string spec(text);
      const at::Tensor& in = spec.find("rot=") != std::string::npos ? x256 : x;
      EncodeArgs args;
      if (spec.rfind("amaq", 0) == 0) args.bits = at::randint(1, 9, {in.size(-1)}, gen, at::kByte);  // every width
      const Encoded fast = Codec(CodecSpec::parse(spec)).encode(in, args);
      const Encoded ref = Codec(CodecSpec::parse(spec), Impl::kRef).encode(in, args);
      EXPECT_EQ(fast.packet, ref.packet) << spec;
      EXPECT_TRUE(at::equal(fast.decoded, ref.decoded)) << spec;
      EXPECT_TRUE(at::equal(Codec(CodecSpec::parse(spec)).decode(fast.packet), ref.decoded)) << spec;
    }
  });
}

// The one-pass encoder rounds each block of rows' fp16 bounds relative to the block's own power of
// two: row blocks of every magnitude against the tensor's largest (equal; just inside fp16's normal
// range relative to the tensor's scale; just below it, where the block is encoded again; in its
// subnormals; underflowing to zero), blocks whose every value is in the binade below fp16's normal
// range, zero rows, tensors whose largest |value| is a power of two, a float subnormal or near
// fp32's largest: the reference's packets, and a power-of-two scale with max |x| in [2^14, 2^15) of it.
TEST(LaneVersions, RowBlocksOfEveryMagnitudeWriteTheReferencesPackets) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(15);
  const at::Tensor base = testing::with_outlier_channels(testing::student_t3({1, 200, 256}, gen)).contiguous();
  std::vector<at::Tensor> inputs;
  at::Tensor mixed = base.clone();
  const float max_abs = mixed.abs().max().item<float>();
  // Units of 8 rows (an encoder's block is one or two), each scaled so that its largest |value| is
  // max_abs * 2^-k; the first unit keeps the largest.
  const int exponents[] = {0, 3, 14, 27, 28, 29, 30, 34, 40, 60, 140, 12, 16};
  for (int64_t i = 1, r = 8; r < 200; ++i, r += 8) {
    at::Tensor rows = mixed.narrow(1, r, 8);
    const float row_max = rows.abs().max().item<float>();
    rows.mul_(std::ldexp(max_abs, -exponents[i % 13]) / row_max);
  }
  mixed.narrow(1, 40, 3).zero_();
  inputs.push_back(mixed);
  // Rows whose every value lies in [2^-15, 2^-14) of the scale (2^-14, as max |x| is 1.75): fp16
  // subnormals relative to it, though normal relative to their own power of two.
  at::Tensor sub = base / base.abs().max() * 1.75f;
  const at::Tensor magnitude = at::rand({1, 32, 256}, gen) * 0.85f + 1.05f;
  const at::Tensor sign = at::randint(0, 2, {1, 32, 256}, gen).mul(2).sub(1);
  sub.narrow(1, 64, 32).copy_(magnitude * sign * std::ldexp(1.0f, -29));
  inputs.push_back(sub);
  inputs.push_back(base / base.abs().max() * 4.0f);    // the largest |value| a power of two
  inputs.push_back(base / base.abs().max() * 1e-39f);  // fp32 subnormals
  inputs.push_back(base / base.abs().max() * 3e38f);   // near fp32's largest
  for_each_lane_width([&] {
    for (size_t i = 0; i < inputs.size(); ++i) {
      for (const char* text : {"fixed:bits=4,group=64", "fixed:bits=3,gran=token", "fixed:bits=8,group=32",
                               "fixed:bits=4,group=64,rot=hadamard", "amaq:budget=4,group=32"}) {
        const std::string spec(text);
        if (i == 4 && spec.find("rot=") != std::string::npos) continue;  // a rotation overflows there
        SCOPED_TRACE(spec + ", input " + std::to_string(i));
        EncodeArgs args;
        if (spec.rfind("amaq", 0) == 0) args.bits = at::randint(2, 9, {256}, gen, at::kByte);
        const Encoded fast = Codec(CodecSpec::parse(spec)).encode(inputs[i], args);
        const Encoded ref = Codec(CodecSpec::parse(spec), Impl::kRef).encode(inputs[i], args);
        EXPECT_EQ(fast.packet, ref.packet);
        EXPECT_TRUE(at::equal(fast.decoded, ref.decoded));
        PacketHeader h;
        std::memcpy(&h, fast.packet.data(), sizeof h);
        int e = 0;
        EXPECT_EQ(std::frexp(h.scale, &e), 0.5f) << h.scale;  // a power of two
        if (spec.find("rot=") == std::string::npos) {         // max |x| / scale in [2^14, 2^15)
          const float ratio = inputs[i].abs().max().item<float>() / h.scale;
          EXPECT_GE(ratio, 16384.0f);
          EXPECT_LT(ratio, 32768.0f);
        }
      }
    }
  });
}

TEST(LaneVersions, EveryVersionRotatesAsTheTensorOpsDo) {
  // Blocks below one vector, in registers (up to 16 vectors) and with passes in memory beyond.
  const at::Tensor x = at::randn({5, 2048}, at::make_generator<at::CPUGeneratorImpl>(12)) * 3;
  for_each_lane_width([&] {
    for (int64_t block : {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048}) {
      EXPECT_TRUE(at::equal(block_hadamard(x, block), block_hadamard_ops(x, block))) << block;
    }
  });
}

TEST(LaneVersions, EveryVersionCountsNonFiniteValuesAndFindsTheMax) {
  at::Tensor x = at::randn({1000, 37}, at::make_generator<at::CPUGeneratorImpl>(13));
  x[999][36] = -77.0f;  // the last element, in every version's scalar tail
  const float expected = x.abs().max().item<float>();
  for_each_lane_width([&] {
    EXPECT_EQ(checked_max_abs(x), expected);
    at::Tensor bad = x.clone();
    bad[3][1] = std::numeric_limits<float>::quiet_NaN();
    bad[500][0] = std::numeric_limits<float>::infinity();
    bad[999][35] = -std::numeric_limits<float>::infinity();
    try {
      checked_max_abs(bad);
      ADD_FAILURE() << "NaN/Inf not refused";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("3 NaN/Inf values"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("flat index 112"), std::string::npos) << e.what();
    }
    // The encoders' own count (their first pass): a NaN alone, an Inf alone, in a vector body and in
    // a scalar tail, refused with checked_max_abs's message, rotated or not, uniform levels or not.
    const at::Tensor y = at::randn({9, 264}, at::make_generator<at::CPUGeneratorImpl>(14));
    for (const float v : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
      for (const int64_t at_col : {5, 263}) {
        at::Tensor bad_y = y.clone();
        bad_y[7][at_col] = v;
        for (const char* text : {"fixed:bits=4,group=8", "fixed:bits=4,gran=token", "fixed:bits=4,group=8,rot=hadamard",
                                 "fixed:bits=4,group=8,levels=nf", "fixed:bits=3,gran=token,levels=lloyd"}) {
          try {
            Codec(CodecSpec::parse(text)).encode(bad_y, EncodeArgs{});
            ADD_FAILURE() << text << ": " << v << " not refused";
          } catch (const std::exception& e) {
            const std::string where = "flat index " + std::to_string(7 * 264 + at_col) + ")";
            EXPECT_NE(std::string(e.what()).find("1 NaN/Inf values"), std::string::npos) << text << e.what();
            EXPECT_NE(std::string(e.what()).find(where), std::string::npos) << text << e.what();
          }
        }
      }
    }
  });
}

TEST(HalfRanges, TheFastPathsFp16BoundsAreC10HalfsBitForBit) {
  // Token ranges of two values each, relative to the tensor's scale: every exponent of fp32 that
  // fp16 reaches and far below it (fp16 subnormals and zero), both signs, against the reference,
  // whose bounds c10::Half's bit arithmetic rounds (the fast path uses F16C on x86-64-v3 CPUs).
  std::vector<float> values;
  for (uint32_t bits = 0x00000000; bits < 0x3f800000; bits += 12347) {
    float v;
    std::memcpy(&v, &bits, 4);
    values.push_back(v);
  }
  const int64_t n = static_cast<int64_t>(values.size()) / 2 * 2;
  at::Tensor x = at::from_blob(values.data(), {n / 2, 2}, at::kFloat).clone();
  x.select(1, 0).neg_();
  x[0][1] = 1.0f;  // the scale
  const at::Tensor bits = at::full({2}, 4, at::kByte);
  const AffineLayout layout{n / 2, 2, Granularity::kToken, 0};
  const AffineQuant ref = affine_quantize_ref(x, bits, layout, Rounding::kNearest, 0);
  for_each_lane_width([&] {  // 4 lanes: c10::Half's arithmetic; 8 and 16: F16C
    const AffineQuant fast = affine_quantize(x, bits, layout, Rounding::kNearest, 0);
    EXPECT_TRUE(at::equal(fast.lo.view(at::kShort), ref.lo.view(at::kShort)));
    EXPECT_TRUE(at::equal(fast.hi.view(at::kShort), ref.hi.view(at::kShort)));
    EXPECT_TRUE(at::equal(fast.codes, ref.codes));
  });
}

}  // namespace
}  // namespace amaq::quant
